//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use covet_raft_store::{GroupStorage, LogOptions};
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::Storage;

/// An entry whose data names its index and term, so a flipped bit can be
/// aimed at it by searching the segment files for that text.
pub fn entry(index: u64, term: u64) -> Entry {
    entry_with(
        index,
        term,
        format!("entry-{index:06}-term-{term:03}").as_bytes(),
    )
}

pub fn entry_with(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

pub fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    indexes.map(|i| entry(i, term)).collect()
}

pub fn open(dir: &Path, segment_bytes: u64) -> GroupStorage {
    GroupStorage::open(dir, LogOptions { segment_bytes }).expect("open group storage")
}

pub fn first_last(store: &GroupStorage) -> (u64, u64) {
    (
        store.first_index().expect("first index"),
        store.last_index().expect("last index"),
    )
}

/// Every entry in the log, read with no size limit.
pub fn all_entries(store: &GroupStorage) -> Vec<Entry> {
    let (first, last) = first_last(store);
    store.read(first, last + 1, u64::MAX).expect("read all")
}

pub fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

pub fn voters(ids: &[u64]) -> ConfState {
    ConfState {
        voters: ids.to_vec(),
        ..Default::default()
    }
}

pub fn snapshot(index: u64, term: u64, voter_ids: &[u64], data: &[u8]) -> Snapshot {
    let mut s = Snapshot {
        data: data.to_vec().into(),
        ..Default::default()
    };
    let meta = s.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(voters(voter_ids));
    s
}

/// Segment files in the directory, oldest first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
}

/// Index files (`*.idx`) in the directory, oldest first.
pub fn index_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    files.sort();
    files
}

/// The index file of a segment file.
pub fn index_of(segment: &Path) -> PathBuf {
    segment.with_extension("idx")
}

/// Removes every index file; returns how many there were.
pub fn remove_index_files(dir: &Path) -> usize {
    let files = index_files(dir);
    for f in &files {
        fs::remove_file(f).expect("remove index");
    }
    files.len()
}

/// Flips the lowest bit of the first byte of `pattern` in whichever segment
/// file holds it. Returns that file.
pub fn flip_bit_in(dir: &Path, pattern: &[u8]) -> PathBuf {
    for path in segment_files(dir) {
        let bytes = fs::read(&path).expect("read segment");
        if let Some(at) = bytes.windows(pattern.len()).position(|w| w == pattern) {
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open segment");
            file.write_all_at(&[bytes[at] ^ 1], at as u64)
                .expect("flip bit");
            return path;
        }
    }
    panic!("pattern {:?} not found", String::from_utf8_lossy(pattern));
}

/// Where `pattern` starts in `path`.
pub fn find(path: &Path, pattern: &[u8]) -> u64 {
    let bytes = fs::read(path).expect("read segment");
    bytes
        .windows(pattern.len())
        .position(|w| w == pattern)
        .expect("pattern present") as u64
}

pub fn data_of(entries: &[Entry]) -> Vec<(u64, u64, Vec<u8>)> {
    entries
        .iter()
        .map(|e| (e.index, e.term, e.data.to_vec()))
        .collect()
}
