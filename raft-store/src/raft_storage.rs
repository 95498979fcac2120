//! The `raft::Storage` implementation.

use raft::prelude::{ConfState, Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError, NO_LIMIT};

use crate::read::Measure;
use crate::storage::GroupStorage;

impl Storage for GroupStorage {
    /// The hard state and conf state; the snapshot's conf state if none was
    /// ever set.
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.inner.read_state();
        let conf_state = if st.conf_state == ConfState::default() {
            st.snapshot.get_metadata().get_conf_state().clone()
        } else {
            st.conf_state.clone()
        };
        Ok(RaftState::new(st.hard_state.clone(), conf_state))
    }

    /// Entries `[low, high)` limited like `raft::util::limit_size`: by
    /// protobuf-encoded size, always at least one entry. Never asynchronous.
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let limit = max_size.into().filter(|&max| max != NO_LIMIT);
        Ok(self
            .inner
            .read_entries(low, high, limit, Measure::Encoded)?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        Ok(self.inner.read_state().term(idx)?)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read_state().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read_state().last_index())
    }

    /// The stored snapshot if it covers `request_index`; otherwise
    /// `SnapshotTemporarilyUnavailable` (the broker makes snapshots itself,
    /// through `compact`).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let st = self.inner.read_state();
        if st.snapshot_index() >= request_index {
            Ok(st.snapshot.clone())
        } else {
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ))
        }
    }
}
