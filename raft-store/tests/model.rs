//! Property test: random appends (with conflicts), hard-state updates,
//! syncs and reopens agree with raft's `MemStorage`.

mod common;

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
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Mostly plain extensions: each conflict costs several fsyncs.
        6 => (prop_oneof![3 => Just(0u64), 1 => 1u64..5], 1u64..6, any::<bool>(), 0usize..120).prop_map(|(back, count, new_term, data_len)| {
            Op::Append { back, count, new_term, data_len }
        }),
        1 => (0u64..4).prop_map(|vote| Op::SetHardState { vote }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
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
}

impl Run {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Append {
                back,
                count,
                new_term,
                data_len,
            } => {
                let last = self.model.last_index().expect("model last");
                let start = (last + 1).saturating_sub(back).max(1);
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
            Op::Reopen => {
                self.store = open(self.dir.path(), self.segment_bytes);
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
        for i in 0..=last {
            assert_eq!(
                self.store.term(i).ok(),
                self.model.term(i).ok(),
                "term({i})"
            );
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
        segment_bytes in 256u64..2048,
        max_size in 0u64..600,
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        let dir = TempDir::new().expect("tempdir");
        let store = open(dir.path(), segment_bytes);
        let mut run = Run { dir, segment_bytes, store, model: MemStorage::new(), term: 1 };
        for op in &ops {
            run.apply(op);
            run.check(max_size);
        }
        run.store.sync().expect("sync");
        run.store = open(run.dir.path(), segment_bytes);
        run.check(max_size);
    }
}
