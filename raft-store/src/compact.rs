//! Snapshots: compaction (retention) on any node, and `apply_snapshot` on
//! a follower that receives one.
//!
//! Both write the `snapshot` file first (atomically and durably) and only
//! then touch segments, so that the file is the commit point and recovery
//! can finish an interrupted operation: it deletes segments named below the
//! recorded first index (compaction) or of an older generation
//! (`apply_snapshot`). Removing a segment removes its index file first.

use raft::prelude::Snapshot;

use crate::error::StoreError;
use crate::segment::Segment;
use crate::snapfile::{self, sync_dir, SnapshotFile};
use crate::state::plain_conf_state;
use crate::storage::{GroupStorage, Inner, Writer};
use crate::write::remove_segment_file;

impl GroupStorage {
    /// Stores `snapshot` durably, then unlinks every whole segment whose
    /// entries all have an index ≤ the snapshot's (never the active one).
    ///
    /// Afterwards `first_index` is the first index of the first remaining
    /// segment, which may be ≤ the snapshot index: those entries stay
    /// readable. The snapshot's index must lie between the stored
    /// snapshot's index and the last index, and its term must match the
    /// log's. Also syncs everything written so far; appends to this group
    /// wait while it runs (a few fsyncs).
    pub fn compact(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let _syncing = self.inner.lock_sync();
        let mut w = self.inner.lock_writer()?;
        let result = self.inner.compact_locked(&mut w, snapshot);
        w.guard(result)
    }

    /// Installs a snapshot received from the leader: stores it durably and
    /// discards the whole log, so that `first_index` = `last_index + 1` =
    /// snapshot index + 1. The conf state becomes the snapshot's, and the
    /// hard state's commit (and term) are raised to at least the
    /// snapshot's. Durable when it returns.
    ///
    /// Call it only with a snapshot Raft asked to apply (`Ready::snapshot`):
    /// Raft guarantees no committed entry follows the snapshot index.
    pub fn apply_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let _syncing = self.inner.lock_sync();
        let mut w = self.inner.lock_writer()?;
        let result = self.inner.apply_snapshot_locked(&mut w, snapshot);
        w.guard(result)
    }
}

impl Inner {
    /// The snapshot file describing the current state, with fresh sequence
    /// numbers for the hard and conf state.
    pub(crate) fn current_snapshot_file(&self, w: &mut Writer) -> SnapshotFile {
        let st = self.read_state();
        SnapshotFile {
            generation: st.generation,
            first_index: st.first_index(),
            prev_term: st.prev_term,
            hard_state: (w.take_seq(), st.hard_state.clone()),
            conf_state: (w.take_seq(), st.conf_state.clone()),
            snapshot: st.snapshot.clone(),
        }
    }

    fn compact_locked(&self, w: &mut Writer, snapshot: Snapshot) -> Result<(), StoreError> {
        let (removable, first_index, prev_term) = self.plan_compaction(&snapshot)?;
        // The snapshot file will say the log starts at the kept segments:
        // they must be durable (file contents and names) before it does.
        self.sync_locked(w)?;
        let mut file = self.current_snapshot_file(w);
        file.first_index = first_index;
        file.prev_term = prev_term;
        file.snapshot = snapshot;
        snapfile::store(&self.dir, &file)?;
        let removed: Vec<Segment> = {
            let mut st = self.write_state();
            st.prev_term = prev_term;
            st.snapshot = file.snapshot;
            let removed: Vec<Segment> = st.segments.drain(..removable).collect();
            // Before the files go: readers that planned on them retry.
            for segment in &removed {
                segment.file.retire();
            }
            removed
        };
        for segment in &removed {
            remove_segment_file(&segment.path)?;
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Validates a compaction snapshot; returns how many segments go, and
    /// the first index and previous term of the log that remains.
    fn plan_compaction(&self, snapshot: &Snapshot) -> Result<(usize, u64, u64), StoreError> {
        let meta = snapshot.get_metadata();
        let st = self.read_state();
        if meta.index < st.snapshot_index() {
            return Err(StoreError::SnapshotOutOfDate {
                index: meta.index,
                current: st.snapshot_index(),
            });
        }
        let invalid = |reason: String| StoreError::InvalidSnapshot {
            index: meta.index,
            reason,
        };
        if meta.index > st.last_index() {
            return Err(invalid(format!(
                "beyond the last index {}",
                st.last_index()
            )));
        }
        let term = st.term(meta.index)?;
        if term != meta.term {
            return Err(invalid(format!(
                "term {} but the log has term {term}",
                meta.term
            )));
        }
        let older = &st.segments[..st.segments.len() - 1];
        let removable = older
            .iter()
            .take_while(|s| s.last_index() <= meta.index)
            .count();
        let first_index = st.segments[removable].first_index;
        Ok((removable, first_index, st.term(first_index - 1)?))
    }

    fn apply_snapshot_locked(&self, w: &mut Writer, snapshot: Snapshot) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata().clone();
        let mut file = self.current_snapshot_file(w);
        let current = file.snapshot.get_metadata().index;
        if meta.index < current {
            return Err(StoreError::SnapshotOutOfDate {
                index: meta.index,
                current,
            });
        }
        file.generation += 1;
        file.first_index = meta.index + 1;
        file.prev_term = meta.term;
        let hs = &mut file.hard_state.1;
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        file.conf_state.1 = plain_conf_state(meta.get_conf_state());
        file.snapshot = snapshot;
        // The commit point: from here recovery treats the old log as stale.
        snapfile::store(&self.dir, &file)?;

        let old: Vec<_> = {
            // Readers that located entries in the old log retry from here
            // on, and never open its files again (their names may be
            // reused by the new log).
            let mut st = self.write_state();
            st.rewrites += 1;
            st.segments
                .iter()
                .map(|s| {
                    s.file.retire();
                    s.path.clone()
                })
                .collect()
        };
        for path in old.iter().rev() {
            remove_segment_file(path)?;
        }
        let (hs, cs) = (&file.hard_state.1, &file.conf_state.1);
        let (hs_seq, cs_seq) = (w.take_seq(), w.take_seq());
        let segment = Segment::create(
            &self.dir,
            file.first_index,
            file.generation,
            (hs_seq, hs),
            (cs_seq, cs),
        )?;
        segment
            .file
            .get()
            .and_then(|f| f.sync_data())
            .map_err(|e| StoreError::io("fdatasync segment", &segment.path, e))?;
        sync_dir(&self.dir)?;
        w.forget_unsynced();

        let mut st = self.write_state();
        st.segments = vec![segment];
        st.hard_state = file.hard_state.1;
        st.conf_state = file.conf_state.1;
        st.snapshot = file.snapshot;
        st.prev_term = file.prev_term;
        st.generation = file.generation;
        Ok(())
    }
}
