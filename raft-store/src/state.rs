//! The in-memory view of a group's log, shared by writers and readers.

use raft::prelude::{ConfState, HardState, Snapshot};

use crate::error::StoreError;
use crate::segment::Segment;
use crate::SegmentInfo;

/// Everything a reader needs to locate entries, plus the current hard
/// state, conf state and snapshot. Guarded by the group's `RwLock`.
#[derive(Debug)]
pub(crate) struct LogState {
    /// Never empty; sorted by first index and contiguous; the last one is
    /// the active segment, the only one written to.
    pub segments: Vec<Segment>,
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub snapshot: Snapshot,
    /// The term of entry `first_index() - 1`.
    pub prev_term: u64,
    /// The log generation, bumped by `apply_snapshot`.
    pub generation: u64,
    /// Bumped *before* any change that rewrites bytes a reader may already
    /// have located (truncating a suffix, discarding the log). A reader
    /// that sees it change while it read retries instead of reporting the
    /// rewritten bytes as corruption.
    pub rewrites: u64,
}

impl LogState {
    pub(crate) fn first_index(&self) -> u64 {
        self.segments[0].first_index
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.active().last_index()
    }

    pub(crate) fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub(crate) fn active(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    pub(crate) fn active_mut(&mut self) -> &mut Segment {
        let last = self.segments.len() - 1;
        &mut self.segments[last]
    }

    /// The position in `segments` of the segment holding entry `index`.
    pub(crate) fn segment_for(&self, index: u64) -> Option<usize> {
        let after = self.segments.partition_point(|s| s.first_index <= index);
        let slot = after.checked_sub(1)?;
        self.segments[slot].contains(index).then_some(slot)
    }

    /// Raft's `term`: valid for `[first_index - 1, last_index]`.
    pub(crate) fn term(&self, index: u64) -> Result<u64, StoreError> {
        let first_index = self.first_index();
        if index == first_index - 1 {
            return Ok(self.prev_term);
        }
        if index < first_index {
            return Err(StoreError::Compacted { index, first_index });
        }
        self.segment_for(index)
            .and_then(|slot| self.segments[slot].term(index))
            .ok_or(StoreError::Unavailable {
                index,
                last_index: self.last_index(),
            })
    }

    /// Checks that `[low, high)` can be read: not compacted, not past the end.
    pub(crate) fn check_range(&self, low: u64, high: u64) -> Result<(), StoreError> {
        let first_index = self.first_index();
        if low < first_index {
            return Err(StoreError::Compacted {
                index: low,
                first_index,
            });
        }
        let last_index = self.last_index();
        if high > last_index + 1 {
            return Err(StoreError::Unavailable {
                index: high,
                last_index,
            });
        }
        Ok(())
    }

    pub(crate) fn segment_infos(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|s| SegmentInfo {
                first_index: s.first_index,
                last_index: s.last_index(),
                bytes: s.end,
            })
            .collect()
    }
}

/// Whether two hard states carry the same values (ignoring protobuf's
/// unknown fields and cached sizes).
pub(crate) fn same_hard_state(a: &HardState, b: &HardState) -> bool {
    a.term == b.term && a.vote == b.vote && a.commit == b.commit
}

/// A hard state with only the fields this crate persists.
pub(crate) fn plain_hard_state(hs: &HardState) -> HardState {
    HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
        ..Default::default()
    }
}

/// A conf state with only the fields this crate persists.
pub(crate) fn plain_conf_state(cs: &ConfState) -> ConfState {
    ConfState {
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
        voters_outgoing: cs.voters_outgoing.clone(),
        learners_next: cs.learners_next.clone(),
        auto_leave: cs.auto_leave,
        ..Default::default()
    }
}
