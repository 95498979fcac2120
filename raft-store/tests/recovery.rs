//! Recovery after a crash or a power cut: what open makes durable, how it
//! tells a never-synced tail (cut) from damage to synced data (`Corrupt`),
//! and how a read that meets corruption marks the group faulted.
//!
//! A test cannot observe the page cache, so "open synced it" is checked
//! through the counters of [`OpenStats`]; dropping a store without `sync`
//! stands for `kill -9` (the page cache keeps the writes), and editing the
//! segment file afterwards stands for what a power cut left on the disk.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use covet_raft_store::{GroupStorage, LogOptions, StoreError};
use raft::{GetEntriesContext, Storage, StorageError};
use tempfile::TempDir;

/// Where the frame of entry `index` (written by `common::entry`) starts:
/// its data follows an 8-byte frame header and a 22-byte record header.
fn frame_of(path: &Path, index: u64) -> u64 {
    find(path, format!("entry-{index:06}").as_bytes()) - 22 - 8
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).expect("open");
    file.write_all_at(bytes, at).expect("overwrite");
}

fn open_err(dir: &Path) -> StoreError {
    GroupStorage::open(dir, LogOptions::default()).expect_err("open must fail")
}

/// Entries 1..=10 and a hard state, synced; then entries 11 and 12 and a
/// newer hard state in three separate writes, never synced. Returns the
/// segment file.
fn synced_then_unsynced(dir: &Path) -> PathBuf {
    let store = open(dir, 1 << 20);
    store.append(&entries(1..=10, 1)).expect("append");
    store.set_hard_state(&hard_state(1, 1, 10)).expect("hs");
    store.sync().expect("sync");
    store.append(&[entry(11, 2)]).expect("append 11");
    store.append(&[entry(12, 2)]).expect("append 12");
    store.set_hard_state(&hard_state(2, 2, 12)).expect("hs");
    segment_files(dir).remove(0)
}

#[test]
fn open_syncs_the_active_segment_and_the_directories() {
    let root = TempDir::new().expect("tempdir");
    // A group directory two levels below an existing one: both levels are
    // created, and each is fsynced into its parent.
    let dir = root.path().join("groups").join("7");
    let store = open(&dir, 1 << 20);
    let stats = store.open_stats();
    assert_eq!(stats.files_synced, 1, "{stats:?}");
    assert!(stats.dirs_synced >= 3, "{stats:?}");
    // Unsynced writes, then a crash that the page cache survives.
    store.append(&entries(1..=5, 1)).expect("append");
    store.set_hard_state(&hard_state(1, 1, 5)).expect("hs");
    drop(store);

    // Recovery keeps the five entries and the vote: it must make them
    // durable before the node can serve or vote on them.
    let store = open(&dir, 1 << 20);
    assert_eq!(first_last(&store), (1, 5));
    assert_eq!(store.hard_state(), hard_state(1, 1, 5));
    let stats = store.open_stats();
    assert_eq!(stats.files_synced, 1, "{stats:?}");
    // The group directory (whose entries recovery trusts) and its parent.
    assert!(stats.dirs_synced >= 2, "{stats:?}");
    assert_eq!(stats.bytes_cut, 0, "{stats:?}");
}

#[test]
fn open_syncs_only_the_last_of_many_segments() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 200);
    store.append(&entries(1..=30, 1)).expect("append");
    let n = store.segments().len();
    assert!(n > 3);
    drop(store);
    let store = open(dir.path(), 200);
    let stats = store.open_stats();
    // Sealed segments were synced when they were sealed.
    assert_eq!((stats.segments_indexed, stats.files_synced), (n - 1, 1));
}

#[test]
fn create_dir_durable_creates_every_missing_level() {
    let root = TempDir::new().expect("tempdir");
    let deep = root.path().join("a").join("b").join("c");
    covet_raft_store::create_dir_durable(&deep).expect("create");
    assert!(deep.is_dir());
    covet_raft_store::create_dir_durable(&deep).expect("existing is fine");
    let file = root.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    assert!(covet_raft_store::create_dir_durable(&file.join("d")).is_err());
}

/// (a) The earlier of two unsynced writes never reached the disk, the
/// later one did: the gap and everything after it are cut.
#[test]
fn gap_in_the_unsynced_tail_is_cut() {
    for garbage in [0x00, 0xab] {
        let dir = TempDir::new().expect("tempdir");
        let path = synced_then_unsynced(dir.path());
        let at = frame_of(&path, 11);
        let len = frame_of(&path, 12) - at;
        overwrite(&path, at, &vec![garbage; len as usize]);

        let store = open(dir.path(), 1 << 20);
        assert_eq!(first_last(&store), (1, 10), "garbage {garbage:#x}");
        assert_eq!(all_entries(&store), entries(1..=10, 1));
        // The newer hard state lay in the cut tail; the synced one is kept.
        assert_eq!(store.hard_state(), hard_state(1, 1, 10));
        assert!(store.open_stats().bytes_cut > 0);
        // The log goes on from the cut, and reopens the same.
        store.append(&[entry(11, 3)]).expect("append");
        store.set_hard_state(&hard_state(3, 3, 11)).expect("hs");
        store.sync().expect("sync");
        drop(store);
        let store = open(dir.path(), 1 << 20);
        let mut want = entries(1..=10, 1);
        want.push(entry(11, 3));
        assert_eq!(all_entries(&store), want);
        assert_eq!(store.hard_state(), hard_state(3, 3, 11));
        assert_eq!(store.open_stats().bytes_cut, 0);
    }
}

/// A lost write in the middle of the unsynced tail that held a conf
/// state: the synced conf state is what open finds.
#[test]
fn a_cut_keeps_the_synced_conf_state() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    store.append(&entries(1..=3, 1)).expect("append");
    store.set_conf_state(&voters(&[1, 2, 3])).expect("cs");
    store.sync().expect("sync");
    store.append(&[entry(4, 1)]).expect("append");
    store.set_conf_state(&voters(&[1, 2])).expect("cs");
    store.append(&[entry(5, 1)]).expect("append");
    drop(store);
    let path = segment_files(dir.path()).remove(0);
    overwrite(&path, frame_of(&path, 4), &[0; 8]);
    let store = open(dir.path(), 1 << 20);
    assert_eq!(first_last(&store), (1, 3));
    assert_eq!(store.conf_state(), voters(&[1, 2, 3]));
}

/// What happened after `synced_then_unsynced`, before the damage.
#[derive(Debug, Clone, Copy)]
enum After {
    /// Nothing: entries 11 and 12 were never synced.
    Nothing,
    /// A reopen, which synced entries 11 and 12 and said so in a marker.
    Reopen,
    /// A reopen, then entry 13 appended and synced.
    ReopenAndSync,
}

/// (b) Damage to a frame that a sync (or open) covered, with a sync
/// marker after it, is not a lost write: the log is refused.
#[test]
fn damage_to_synced_frames_of_the_last_segment_fails_open() {
    for (bad, after) in [
        (5, After::Nothing),
        (5, After::ReopenAndSync),
        (11, After::Reopen),
        (11, After::ReopenAndSync),
    ] {
        let dir = TempDir::new().expect("tempdir");
        let path = synced_then_unsynced(dir.path());
        if !matches!(after, After::Nothing) {
            let store = open(dir.path(), 1 << 20);
            if matches!(after, After::ReopenAndSync) {
                store.append(&[entry(13, 2)]).expect("append");
                store.sync().expect("sync");
            }
        }
        overwrite(&path, frame_of(&path, bad) + 12, &[0x55; 4]);
        let err = open_err(dir.path());
        assert!(
            matches!(&err, StoreError::Corrupt { path: p, reason, .. }
                if *p == path && reason.contains("synced")),
            "entry {bad}, {after:?}: {err:?}"
        );
    }
}

/// A conflicting append truncates the log (durably) and writes on from the
/// cut: what lies before the cut was synced, even though the marker of the
/// sync that covered it was cut away.
#[test]
fn damage_before_a_truncation_point_fails_open() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    store.append(&entries(1..=20, 1)).expect("append");
    store.sync().expect("sync");
    store
        .append(&[entry(15, 2), entry(16, 2)])
        .expect("conflicting append");
    // Not synced: a crash now may lose entries 15 and 16, not 1 to 14.
    drop(store);
    let path = segment_files(dir.path()).remove(0);
    overwrite(&path, frame_of(&path, 10) + 12, &[0x55; 4]);
    let err = open_err(dir.path());
    assert!(
        matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("synced")),
        "{err:?}"
    );
}

/// (c) A torn last write is cut, as before.
#[test]
fn torn_unsynced_write_is_cut() {
    let dir = TempDir::new().expect("tempdir");
    let path = synced_then_unsynced(dir.path());
    let cut = frame_of(&path, 12) + 10;
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(cut).expect("tear");
    let store = open(dir.path(), 1 << 20);
    assert_eq!(first_last(&store), (1, 11));
    assert_eq!(store.hard_state(), hard_state(1, 1, 10));
}

#[test]
fn a_corrupt_read_is_an_error_and_marks_the_group_faulted() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 200);
    store.append(&entries(1..=30, 1)).expect("append");
    store.sync().expect("sync");
    let first = store.segments()[0];
    drop(store);
    // Bit rot in a sealed segment: open loads it from its index, unread.
    flip_bit_in(
        dir.path(),
        format!("entry-{:06}", first.last_index).as_bytes(),
    );
    let store = open(dir.path(), 200);
    assert_eq!(store.fault(), None);
    assert_eq!(store.term(first.last_index).expect("term"), 1);
    let err = store
        .entries(1, 31, None, GetEntriesContext::empty(false))
        .expect_err("corrupt");
    assert!(
        matches!(err, raft::Error::Store(StorageError::Other(_))),
        "{err:?}"
    );
    let fault = store.fault().expect("faulted");
    assert!(fault.contains("checksum"), "{fault}");
    // Entries before the damage still read; the fault stays.
    assert_eq!(
        store
            .read(1, first.last_index, u64::MAX)
            .expect("read")
            .len() as u64,
        first.last_index - 1
    );
    assert!(store.fault().is_some());
    // A clone of the handle sees the same fault.
    assert!(store.clone().fault().is_some());
}

#[test]
fn read_through_group_storage_read_also_marks_the_fault() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(dir.path(), 1 << 20);
    store.append(&entries(1..=10, 1)).expect("append");
    store.sync().expect("sync");
    flip_bit_in(dir.path(), b"entry-000004");
    assert!(matches!(
        store.read(1, 11, u64::MAX),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(store.fault().is_some());
}

/// Damage a power cut may leave in the never-synced region of a file.
#[derive(Debug, Clone)]
enum Loss {
    /// A range of unsynced writes that never reached the disk (zeros), or
    /// reached it as garbage (stale blocks): `(start, len)` as fractions
    /// of the unsynced region, in 1/1000.
    Range { start: u16, len: u16, garbage: bool },
    /// The file's length update did not land past this point.
    Shorten { at: u16 },
}

fn loss() -> impl proptest::strategy::Strategy<Value = Loss> {
    use proptest::prelude::*;
    prop_oneof![
        (0u16..1000, 1u16..400, any::<bool>()).prop_map(|(start, len, garbage)| Loss::Range {
            start,
            len,
            garbage
        }),
        (0u16..1000).prop_map(|at| Loss::Shorten { at }),
    ]
}

/// Applies `losses` to the bytes of `path` from `synced` on.
fn power_cut(path: &Path, synced: u64, losses: &[Loss]) {
    let mut bytes = std::fs::read(path).expect("read");
    let region = bytes.len() as u64 - synced;
    let at = |fraction: u16| synced + region * u64::from(fraction) / 1000;
    for loss in losses {
        match *loss {
            Loss::Range {
                start,
                len,
                garbage,
            } => {
                // An earlier `Shorten` may have cut the file before it.
                let end = bytes.len() as u64;
                let from = at(start).min(end);
                let to = (from + region * u64::from(len) / 1000).min(end);
                for (i, b) in bytes[from as usize..to as usize].iter_mut().enumerate() {
                    *b = if garbage {
                        (i as u8).wrapping_mul(167) ^ 0x5a
                    } else {
                        0
                    };
                }
            }
            Loss::Shorten { at: cut } => bytes.truncate(at(cut) as usize),
        }
    }
    std::fs::write(path, &bytes).expect("write back");
}

/// One Raft round's writes, in three `pwrite`s: entries, an entry, and a
/// hard state committing it.
fn round(store: &GroupStorage, next: &mut u64) {
    store
        .append(&entries(*next..=*next + 2, 1))
        .expect("append");
    *next += 3;
    store.append(&[entry(*next, 1)]).expect("append");
    store.set_hard_state(&hard_state(1, 1, *next)).expect("hs");
    *next += 1;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Whatever a power cut does to writes made after the last sync, open
    /// succeeds, keeps every synced entry and the synced hard state (or a
    /// later one it wrote), and cuts the rest cleanly.
    #[test]
    fn a_power_cut_never_loses_synced_data_nor_refuses_to_open(
        synced_rounds in 1u64..4,
        unsynced_rounds in 1u64..5,
        losses in proptest::collection::vec(loss(), 1..4),
    ) {
        let dir = TempDir::new().expect("tempdir");
        let store = open(dir.path(), 1 << 20);
        let mut next = 1;
        let mut synced = 0;
        for _ in 0..synced_rounds {
            round(&store, &mut next);
            // What this sync covers (its marker comes after).
            synced = store.segments()[0].bytes;
            store.sync().expect("sync");
        }
        let synced_last = next - 1;
        for _ in 0..unsynced_rounds {
            round(&store, &mut next);
        }
        drop(store);
        let path = segment_files(dir.path()).remove(0);
        power_cut(&path, synced, &losses);

        let store = GroupStorage::open(dir.path(), LogOptions::default())
            .expect("a power cut never makes open refuse the log");
        let (first, last) = first_last(&store);
        proptest::prop_assert_eq!(first, 1);
        proptest::prop_assert!(last >= synced_last, "lost synced entries: {} < {}", last, synced_last);
        let mut want = Vec::new();
        for index in 1..=last {
            want.push(entry(index, 1));
        }
        proptest::prop_assert_eq!(all_entries(&store), want);
        let hs = store.hard_state();
        proptest::prop_assert!(hs.commit >= synced_last && hs.commit <= last, "{:?}", hs);
        drop(store);
        // And the recovered log reopens as it is.
        let store = open(dir.path(), 1 << 20);
        proptest::prop_assert_eq!(first_last(&store), (1, last));
        proptest::prop_assert_eq!(store.open_stats().bytes_cut, 0);
    }
}
