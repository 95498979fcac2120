//! Property test: random appends (with conflicts), hard-state updates,
//! syncs, compactions, snapshot installs and reopens agree with raft's
//! `MemStorage`; reopens load every sealed segment from its index, and the
//! indexes equal what a full scan rebuilds.

mod common;

use std::fs;

use common::*;
use covet_raft_store::GroupStorage;
use proptest::prelude::*;
use raft::prelude::{Entry, HardState};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, Storage};
use tempfile::TempDir;

#[derive(Debug, Clone)]
enum Op {
    /// Append `count` entries starting `back` entries before the end,
    /// with a new term if `new_term`, each with `data_len` bytes of data.
    Append {
        back: u64,
        count: u64,
        new_term: bool,
        data_len: usize,
    },
    SetHardState {
        vote: u64,
    },
    Sync,
    Reopen,
    /// Compact with a snapshot `back` entries before the end (clamped to
    /// what the store accepts).
    Compact {
        back: u64,
    },
    /// Install a snapshot `ahead` entries beyond the log and the commit.
    ApplySnapshot {
        ahead: u64,
        new_term: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Mostly plain extensions: each conflict costs several fsyncs.
        12 => (prop_oneof![3 => Just(0u64), 1 => 1u64..5], 1u64..6, any::<bool>(), 0usize..120).prop_map(|(back, count, new_term, data_len)| {
            Op::Append { back, count, new_term, data_len }
        }),
        2 => (0u64..4).prop_map(|vote| Op::SetHardState { vote }),
        2 => Just(Op::Sync),
        2 => Just(Op::Reopen),
        2 => (0u64..20).prop_map(|back| Op::Compact { back }),
        1 => (1u64..4, any::<bool>()).prop_map(|(ahead, new_term)| Op::ApplySnapshot { ahead, new_term }),
    ]
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

struct Run {
    dir: TempDir,
    segment_bytes: u64,
    store: GroupStorage,
    model: MemStorage,
    term: u64,
    /// The stored snapshot's index: nothing at or below it is rewritten.
    snapshot_index: u64,
    /// The store's first index, and the term of the entry before it.
    /// `MemStorage::compact` forgets that term, so it is kept here.
    first_index: u64,
    prev_term: u64,
}

impl Run {
    /// The term the store must report for entry `i`.
    fn expected_term(&self, i: u64) -> Option<u64> {
        if i + 1 < self.first_index {
            None
        } else if i + 1 == self.first_index {
            Some(self.prev_term)
        } else {
            self.model.term(i).ok()
        }
    }

    fn reopen(&mut self) {
        // The last segment's file: what was written, and any space
        // preallocated after it (open examines all of it).
        let last_path = segment_files(self.dir.path())
            .pop()
            .expect("a segment file");
        let last_bytes = std::fs::metadata(&last_path).expect("stat").len();
        self.store = open(self.dir.path(), self.segment_bytes);
        // Every sealed segment has an index, so only the last is read.
        let stats = self.store.open_stats();
        let segments = self.store.segments();
        assert_eq!(stats.segments_scanned, 1, "{stats:?}");
        assert_eq!(stats.segments_indexed, segments.len() - 1, "{stats:?}");
        assert_eq!(stats.indexes_written, 0, "{stats:?}");
        // All of the last segment as it was (open may then have added a
        // sync marker for what it kept).
        assert_eq!(stats.bytes_scanned, last_bytes - 32);
        assert_eq!(stats.files_synced, 1);
        assert_eq!(index_files(self.dir.path()).len(), segments.len() - 1);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append {
                back,
                count,
                new_term,
                data_len,
            } => {
                let last = self.model.last_index().expect("model last");
                let start = (last + 1)
                    .saturating_sub(back)
                    .max(1)
                    .max(self.snapshot_index + 1);
                self.term += u64::from(new_term);
                let batch: Vec<Entry> = (start..start + count)
                    .map(|i| entry_with(i, self.term, &vec![(i % 251) as u8; data_len]))
                    .collect();
                self.store.append(&batch).expect("append");
                self.model.wl().append(&batch).expect("model append");
            }
            Op::SetHardState { vote } => {
                let commit = self.model.last_index().expect("model last");
                let hs = hard_state(self.term, vote, commit);
                self.store.set_hard_state(&hs).expect("set hard state");
                self.model.wl().set_hardstate(hs);
            }
            Op::Sync => self.store.sync().expect("sync"),
            Op::Reopen => self.reopen(),
            Op::Compact { back } => {
                let last = self.model.last_index().expect("model last");
                let low = self.snapshot_index.max(self.first_index - 1);
                let index = last - back.min(last - low);
                let term = self.expected_term(index).expect("term of snapshot");
                let before = self.store.segments();
                let kept = before[..before.len() - 1]
                    .iter()
                    .position(|s| s.last_index > index)
                    .unwrap_or(before.len() - 1);
                let first = before[kept].first_index;
                let prev_term = self.expected_term(first - 1).expect("term before first");
                self.store
                    .compact(snapshot(index, term, &[1], b"compacted"))
                    .expect("compact");
                assert_eq!(self.store.segments(), before[kept..].to_vec());
                self.model.wl().compact(first).expect("model compact");
                (self.first_index, self.prev_term) = (first, prev_term);
                self.snapshot_index = index;
            }
            Op::ApplySnapshot { ahead, new_term } => {
                let last = self.model.last_index().expect("model last");
                let commit = self.model.rl().hard_state().commit;
                let index = last.max(commit) + ahead;
                self.term += u64::from(new_term);
                let snap = snapshot(index, self.term, &[1, ahead], b"installed");
                self.store.apply_snapshot(snap.clone()).expect("apply");
                self.model.wl().apply_snapshot(snap).expect("model apply");
                (self.first_index, self.prev_term) = (index + 1, self.term);
                self.snapshot_index = index;
            }
        }
    }

    fn check(&self, max_size: u64) {
        let (first, last) = first_last(&self.store);
        let model_last = self.model.last_index().expect("model last");
        assert_eq!(
            (first, last),
            (self.model.first_index().expect("model first"), model_last)
        );
        assert_eq!(first, self.first_index);
        for i in 0..=last + 1 {
            assert_eq!(self.store.term(i).ok(), self.expected_term(i), "term({i})");
        }
        for low in first..=last + 1 {
            let got = self
                .store
                .entries(low, last + 1, max_size, ctx())
                .expect("entries");
            let want = model_entries(&self.model, low, last + 1, Some(max_size));
            assert_eq!(got, want, "entries({low}, {}, {max_size})", last + 1);
            let read = self.store.read(low, last + 1, max_size).expect("read");
            assert_eq!(
                read,
                limit_data(&want_all(&self.model, low, last + 1), max_size)
            );
        }
        let hs: HardState = self.model.rl().hard_state().clone();
        assert_eq!(self.store.hard_state(), hs);
        let model_state = self.model.initial_state().expect("model state");
        assert_eq!(self.store.conf_state(), model_state.conf_state);
        assert_eq!(
            self.store.stored_snapshot().get_metadata().index,
            self.snapshot_index
        );
    }

    /// Deletes every index, reopens (scanning every segment), and checks
    /// that the rewritten indexes are byte for byte the ones written when
    /// the segments were sealed.
    fn check_indexes_equal_a_scan(&mut self, max_size: u64) {
        let saved: Vec<_> = index_files(self.dir.path())
            .into_iter()
            .map(|p| {
                let bytes = fs::read(&p).expect("read index");
                (p, bytes)
            })
            .collect();
        assert_eq!(remove_index_files(self.dir.path()), saved.len());
        self.store = open(self.dir.path(), self.segment_bytes);
        let stats = self.store.open_stats();
        assert_eq!(stats.segments_scanned, saved.len() + 1, "{stats:?}");
        assert_eq!(stats.indexes_written, saved.len(), "{stats:?}");
        self.check(max_size);
        for (path, bytes) in saved {
            assert_eq!(fs::read(&path).expect("rewritten index"), bytes, "{path:?}");
        }
    }
}

/// `MemStorage::entries` without a limit (it panics on an empty range of
/// an empty log, so that case is answered here).
fn want_all(model: &MemStorage, low: u64, high: u64) -> Vec<Entry> {
    model_entries(model, low, high, None)
}

fn model_entries(model: &MemStorage, low: u64, high: u64, max_size: Option<u64>) -> Vec<Entry> {
    if low >= high {
        return Vec::new();
    }
    model
        .entries(low, high, max_size, ctx())
        .expect("model entries")
}

/// `read`'s limit: data bytes, at least one entry.
fn limit_data(entries: &[Entry], max: u64) -> Vec<Entry> {
    let mut used = 0u64;
    let mut out = Vec::new();
    for e in entries {
        used += e.data.len() as u64;
        if !out.is_empty() && used > max {
            break;
        }
        out.push(e.clone());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn agrees_with_memstorage(
        // Small enough to roll often; every roll costs an fdatasync.
        segment_bytes in 128u64..1024,
        max_size in 0u64..600,
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        let dir = TempDir::new().expect("tempdir");
        let store = open(dir.path(), segment_bytes);
        let mut run = Run {
            dir,
            segment_bytes,
            store,
            model: MemStorage::new(),
            term: 1,
            snapshot_index: 0,
            first_index: 1,
            prev_term: 0,
        };
        for op in &ops {
            run.apply(op);
            run.check(max_size);
        }
        run.store.sync().expect("sync");
        run.reopen();
        run.check(max_size);
        run.check_indexes_equal_a_scan(max_size);
    }
}
