//! The write path: append (with conflicting-suffix truncation and segment
//! rolling) and hard-state / conf-state records.
//!
//! Each call encodes its frames into one buffer and writes it with one
//! `pwrite` at the end of the active segment, then publishes the new index
//! entries. There is no user-space buffer across calls, so every published
//! entry is in the page cache and `read` never needs a flush; nothing is
//! durable until `sync`.
//!
//! Rolling seals the old segment: it is `fdatasync`ed and its index file
//! written (see [`crate::index`]) before the new segment is created.
//!
//! Sync markers (see [`crate::record`]) are written here too: by `sync`
//! once its `fdatasync` returned ([`Inner::write_marker`]), and at the
//! start of the records that follow a suffix truncation, whose cut was
//! just synced. A marker only ever claims bytes a completed sync covered.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::prelude::{ConfState, Entry, HardState};

use crate::error::StoreError;
use crate::fdcache::SegmentFile;
use crate::frame::put_frame;
use crate::index;
use crate::record::{entry_record_len, put_conf_state, put_entry, put_hard_state};
use crate::segment::{marker_frame, preallocate, Segment};
use crate::snapfile::{self, sync_dir};
use crate::state::{plain_conf_state, plain_hard_state, same_hard_state};
use crate::storage::{GroupStorage, Inner, Writer};

/// How far ahead of the written end the active segment's file is grown
/// (see [`Inner::grow_ahead`]). Small enough that thousands of partitions
/// reserve little disk; large enough that the inode is written once per
/// megabyte of log, not once per sync.
pub(crate) const PREALLOCATE_BYTES: u64 = 1 << 20;

/// [`GroupStorage::seal_for_restart`] leaves an active segment smaller
/// than this to be scanned on open: 1 MiB checksums in about a millisecond.
pub const SEAL_ON_STOP_MIN_BYTES: u64 = 1 << 20;

/// What a `sync` made durable: the first `upto` bytes of `file`, the
/// active segment when the sync began, if no rewrite happened since
/// (`rewrites` is `LogState::rewrites` then).
pub(crate) struct SyncClaim {
    pub file: Arc<SegmentFile>,
    pub upto: u64,
    pub rewrites: u64,
}

/// The active segment as a writer sees it.
struct Target {
    path: PathBuf,
    file: Arc<SegmentFile>,
    end: u64,
    allocated: u64,
    salt: u32,
}

impl GroupStorage {
    /// Appends contiguous entries. If the first index is at or below the
    /// last index, the conflicting suffix is truncated first (durably, see
    /// the crate docs). The first index must lie in
    /// `[max(first_index, snapshot index + 1), last_index + 1]`.
    /// Not synced.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        check_batch(entries)?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut w = self.inner.lock_writer()?;
        let result = self.inner.append_locked(&mut w, entries);
        w.guard(result)
    }

    /// Records a new hard state (skipped if unchanged). Not synced.
    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        let mut w = self.inner.lock_writer()?;
        if same_hard_state(&self.inner.read_state().hard_state, hs) {
            return Ok(());
        }
        let result = self
            .inner
            .write_state_records(&mut w, Some(plain_hard_state(hs)), None);
        w.guard(result)
    }

    /// Records a new conf state (skipped if unchanged). Not synced.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        let mut w = self.inner.lock_writer()?;
        let cs = plain_conf_state(cs);
        if self.inner.read_state().conf_state == cs {
            return Ok(());
        }
        let result = self.inner.write_state_records(&mut w, None, Some(cs));
        w.guard(result)
    }
}

/// Checks the batch before anything is written, so a bad entry never
/// leaves half a batch behind.
fn check_batch(entries: &[Entry]) -> Result<(), StoreError> {
    for entry in entries {
        let size = entry_record_len(entry);
        if size > u64::from(u32::MAX) {
            return Err(StoreError::TooLarge {
                what: "entry",
                size,
                limit: u64::from(u32::MAX),
            });
        }
    }
    for pair in entries.windows(2) {
        if pair[1].index != pair[0].index + 1 {
            return Err(StoreError::NonContiguous {
                expected: pair[0].index + 1,
                found: pair[1].index,
            });
        }
    }
    Ok(())
}

impl GroupStorage {
    /// Prepares a clean stop: makes everything written durable, cuts the
    /// active segment's unused preallocated space, and writes the active
    /// segment's index file, so that the next [`GroupStorage::open`] loads
    /// it like a sealed segment's instead of reading and checksumming every
    /// frame (up to a whole segment per group: most of a cold start with
    /// many large logs). Skipped, returning `false`, when the active
    /// segment holds less than [`SEAL_ON_STOP_MIN_BYTES`], which scans in
    /// well under a millisecond.
    ///
    /// The storage stays usable: the next write to the active segment
    /// removes that index durably first, as open does once it has loaded
    /// it, so an index never describes a file that changed since.
    pub fn seal_for_restart(&self) -> Result<bool, StoreError> {
        if self.inner.read_state().active().end < SEAL_ON_STOP_MIN_BYTES {
            return Ok(false);
        }
        self.sync()?;
        let inner = &*self.inner;
        let _syncing = inner.lock_sync();
        let mut w = inner.lock_writer()?;
        let result = inner.seal_active(&mut w);
        w.guard(result).map(|()| true)
    }
}

impl Inner {
    fn append_locked(&self, w: &mut Writer, entries: &[Entry]) -> Result<(), StoreError> {
        let index = entries[0].index;
        let (min, last) = {
            let st = self.read_state();
            (
                st.first_index().max(st.snapshot_index() + 1),
                st.last_index(),
            )
        };
        if index < min || index > last + 1 {
            return Err(StoreError::InvalidAppend {
                index,
                min,
                max: last + 1,
            });
        }
        if index <= last {
            self.truncate_suffix(w, index)?;
        }
        let mut rest = entries;
        while !rest.is_empty() {
            let written = self.write_entries(w, rest)?;
            rest = &rest[written..];
        }
        Ok(())
    }

    /// Writes a prefix of `entries` (at least one) to the active segment,
    /// rolling first if it is full. Returns how many were written.
    fn write_entries(&self, w: &mut Writer, entries: &[Entry]) -> Result<usize, StoreError> {
        self.maybe_roll(w, entries[0].index)?;
        let target = self.target();
        w.buf.clear();
        w.positions.clear();
        for entry in entries {
            let position = target.end + w.buf.len() as u64;
            if !w.positions.is_empty() && position >= self.segment_bytes {
                break;
            }
            if position > u64::from(u32::MAX) {
                return Err(StoreError::TooLarge {
                    what: "segment",
                    size: position,
                    limit: u64::from(u32::MAX),
                });
            }
            w.positions.push(position);
            put_frame(&mut w.buf, target.salt, |b| put_entry(b, entry))?;
        }
        let end = self.write_buffer(w, &target)?;
        let mut st = self.write_state();
        let active = st.active_mut();
        for (entry, &position) in entries.iter().zip(&w.positions) {
            active.push(entry.index, entry.term, position)?;
        }
        active.end = end;
        Ok(w.positions.len())
    }

    /// Starts a new segment at `next_index` once the active one holds at
    /// least one entry and `segment_bytes`, sealing the old one.
    fn maybe_roll(&self, w: &mut Writer, next_index: u64) -> Result<(), StoreError> {
        let (old, generation, hs, cs, old_index) = {
            let st = self.read_state();
            let active = st.active();
            if active.entry_count() == 0 || active.end < self.segment_bytes {
                return Ok(());
            }
            let old = (active.path.clone(), Arc::clone(&active.file));
            (
                old,
                st.generation,
                st.hard_state.clone(),
                st.conf_state.clone(),
                (
                    active.first_index,
                    active.end,
                    index::encode(active, st.generation),
                ),
            )
        };
        // Older segments are always fully synced, so only the last segment
        // can ever have a torn tail; see recovery. A sealed segment is cut
        // back to its end first: it ends where its last frame does, which
        // its index and recovery (only the last segment may hold unused
        // space) rely on.
        let old_file = cut_to_end_and_sync(&old.1, &old.0, old_index.1)?;
        // The index describes synced bytes that will not change (a
        // truncation into this segment removes the index first). Its rename
        // becomes durable with the directory fsync the new segment needs.
        let (first_index, end, bytes) = old_index;
        write_index(&self.dir, &old.0, &old_file, first_index, end, &bytes);
        drop(old_file);
        let (hs_seq, cs_seq) = (w.take_seq(), w.take_seq());
        let segment = Segment::create(
            &self.dir,
            next_index,
            generation,
            (hs_seq, &hs),
            (cs_seq, &cs),
        )?;
        w.note_unsynced(&segment.file);
        w.dir_dirty = true;
        self.write_state().segments.push(segment);
        Ok(())
    }

    /// Appends hard-state and/or conf-state records and publishes them.
    pub(crate) fn write_state_records(
        &self,
        w: &mut Writer,
        hs: Option<HardState>,
        cs: Option<ConfState>,
    ) -> Result<(), StoreError> {
        self.write_records(w, false, hs, cs)
    }

    /// Appends, in one write, a sync marker for everything before it (if
    /// `synced`: the caller has just made the whole active segment
    /// durable), then hard-state and/or conf-state records.
    fn write_records(
        &self,
        w: &mut Writer,
        synced: bool,
        hs: Option<HardState>,
        cs: Option<ConfState>,
    ) -> Result<(), StoreError> {
        let target = self.target();
        w.buf.clear();
        if synced {
            w.buf.extend(marker_frame(target.salt, target.end)?);
        }
        let hs = hs.map(|hs| (w.take_seq(), hs));
        let cs = cs.map(|cs| (w.take_seq(), cs));
        if let Some((seq, hs)) = &hs {
            put_frame(&mut w.buf, target.salt, |b| {
                put_hard_state(b, *seq, hs);
                Ok(())
            })?;
        }
        if let Some((seq, cs)) = &cs {
            put_frame(&mut w.buf, target.salt, |b| {
                put_conf_state(b, *seq, cs);
                Ok(())
            })?;
        }
        let end = self.write_buffer(w, &target)?;
        let mut st = self.write_state();
        let active = st.active_mut();
        active.end = end;
        if synced {
            active.note_marker(target.end, target.end);
        }
        if let Some((seq, hs)) = &hs {
            active.note_hard_state(*seq, hs);
        }
        if let Some((seq, cs)) = &cs {
            active.note_conf_state(*seq, cs);
        }
        if let Some((_, hs)) = hs {
            st.hard_state = hs;
        }
        if let Some((_, cs)) = cs {
            st.conf_state = cs;
        }
        Ok(())
    }

    /// Writes a sync marker claiming `upto` at the end of the active
    /// segment, for a `sync` that has just made the file's first `upto`
    /// bytes durable, unless the file changed under it or a marker already
    /// vouches for them. The marker itself is not synced (it is advisory:
    /// losing it only makes recovery treat a bad frame before it as part
    /// of a never-synced tail), so it does not make the segment dirty.
    pub(crate) fn write_marker(
        &self,
        _held: &mut Writer,
        claim: &SyncClaim,
    ) -> Result<(), StoreError> {
        let target = {
            let st = self.read_state();
            let active = st.active();
            // A truncation or a snapshot may have rewritten the bytes the
            // sync covered, or a roll sealed that segment (synced whole).
            if st.rewrites != claim.rewrites
                || !Arc::ptr_eq(&active.file, &claim.file)
                || claim.upto <= active.vouched
            {
                return Ok(());
            }
            Target {
                path: active.path.clone(),
                file: Arc::clone(&active.file),
                end: active.end,
                allocated: active.allocated,
                salt: active.salt,
            }
        };
        self.drop_active_index(_held)?;
        let frame = marker_frame(target.salt, claim.upto)?;
        target
            .file
            .get()
            .and_then(|f| f.write_all_at(&frame, target.end))
            .map_err(|e| StoreError::io("write segment", &target.path, e))?;
        let mut st = self.write_state();
        let active = st.active_mut();
        active.end = target.end + frame.len() as u64;
        active.allocated = active.allocated.max(active.end);
        active.note_marker(target.end, claim.upto);
        Ok(())
    }

    /// See [`GroupStorage::seal_for_restart`]; the caller has synced and
    /// holds the sync and writer locks.
    fn seal_active(&self, w: &mut Writer) -> Result<(), StoreError> {
        let (path, file, first_index, end, vouched, salt) = {
            let st = self.read_state();
            let active = st.active();
            (
                active.path.clone(),
                Arc::clone(&active.file),
                active.first_index,
                active.end,
                active.vouched,
                active.salt,
            )
        };
        // The index claims the file is synced up to its end with nothing
        // damaged in it: a later scan (after the index is gone) must be
        // able to tell damage there from a lost write, so the file ends
        // with a marker vouching for all of it.
        if vouched < end {
            let frame = marker_frame(salt, end)?;
            file.get()
                .and_then(|f| f.write_all_at(&frame, end))
                .map_err(|e| StoreError::io("write segment", &path, e))?;
            let mut st = self.write_state();
            let active = st.active_mut();
            active.end = end + frame.len() as u64;
            active.allocated = active.allocated.max(active.end);
            active.note_marker(end, end);
        }
        let (end, bytes) = {
            let st = self.read_state();
            let active = st.active();
            (active.end, index::encode(active, st.generation))
        };
        drop(cut_to_end_and_sync(&file, &path, end)?);
        self.write_state().active_mut().allocated = end;
        index::store(&self.dir, first_index, &bytes)?;
        sync_dir(&self.dir)?;
        w.active_index_on_disk = true;
        Ok(())
    }

    /// Before the active segment changes: removes, durably, the index that
    /// [`GroupStorage::seal_for_restart`] wrote for it.
    fn drop_active_index(&self, w: &mut Writer) -> Result<(), StoreError> {
        if !w.active_index_on_disk {
            return Ok(());
        }
        let path = self.read_state().active().path.clone();
        if index::remove(&path)? {
            sync_dir(&self.dir)?;
        }
        w.active_index_on_disk = false;
        Ok(())
    }

    fn target(&self) -> Target {
        let st = self.read_state();
        let active = st.active();
        Target {
            path: active.path.clone(),
            file: Arc::clone(&active.file),
            end: active.end,
            allocated: active.allocated,
            salt: active.salt,
        }
    }

    /// Writes `w.buf` at the end of the target (growing the file ahead of
    /// it first, see [`Inner::grow_ahead`]); returns the new end, the
    /// active segment's `allocated` updated.
    fn write_buffer(&self, w: &mut Writer, target: &Target) -> Result<u64, StoreError> {
        self.drop_active_index(w)?;
        let end = target.end + w.buf.len() as u64;
        let allocated = self.grow_ahead(w, target, end);
        target
            .file
            .get()
            .and_then(|f| f.write_all_at(&w.buf, target.end))
            .map_err(|e| StoreError::io("write segment", &target.path, e))?;
        w.note_unsynced(&target.file);
        self.write_state().active_mut().allocated = allocated.max(end);
        Ok(end)
    }

    /// Makes the active segment's file at least `end` bytes long, with
    /// [`PREALLOCATE_BYTES`] to spare, if it is not already: an
    /// `fdatasync` after a write that changes the file's size also writes
    /// the inode (a second I/O, ~35 µs of every acknowledgement here), one
    /// into allocated space does not. Stops at the segment's roll size.
    /// Returns the file's length as now known. Best effort: where the
    /// filesystem cannot preallocate, or the call fails, the write just
    /// appends (a failure is logged once and preallocation stops for this
    /// log); recovery tells the zeros of unused space from frames, and a
    /// roll cuts the sealed segment back to its end.
    fn grow_ahead(&self, w: &mut Writer, target: &Target, end: u64) -> u64 {
        if !w.preallocate || end <= target.allocated {
            return target.allocated;
        }
        let want = (end + PREALLOCATE_BYTES)
            .next_multiple_of(PREALLOCATE_BYTES)
            .min(self.segment_bytes);
        if want <= end {
            return target.allocated;
        }
        let grown = target
            .file
            .get()
            .and_then(|f| preallocate(&f, target.allocated, want));
        match grown {
            Ok(()) => want,
            Err(err) => {
                if err.kind() != ErrorKind::Unsupported {
                    tracing::warn!(path = %target.path.display(), %err, "cannot preallocate the log; appending instead");
                }
                w.preallocate = false;
                // A failed fallocate may still have grown the file: a roll
                // cuts a sealed segment back to its end whatever this says.
                target.allocated
            }
        }
    }

    /// Removes entries from `index` (≤ last index) on, durably, before the
    /// caller writes the replacements.
    fn truncate_suffix(&self, w: &mut Writer, index: u64) -> Result<(), StoreError> {
        // The part cut away may hold the only copy of the latest synced hard
        // or conf state: first make the current ones durable in the
        // snapshot file, with higher sequence numbers than any record.
        let file = self.current_snapshot_file(w);
        snapfile::store(&self.dir, &file)?;
        let (path, file, position, removed) = {
            let mut st = self.write_state();
            st.rewrites += 1;
            let last_index = st.last_index();
            let slot = st
                .segment_for(index)
                .ok_or(StoreError::Unavailable { index, last_index })?;
            let removed = st.segments.split_off(slot + 1);
            // Before the files go: no reader opens them again (their names
            // may be reused).
            for segment in &removed {
                segment.file.retire();
            }
            let segment = &mut st.segments[slot];
            let position = segment.truncate_from(index);
            (
                segment.path.clone(),
                Arc::clone(&segment.file),
                position,
                removed,
            )
        };
        // The segment cut into becomes the active one again. If it was
        // sealed, its index must be gone durably before its contents
        // change: otherwise a crash after it is sealed again could bring
        // the old index back for a file that may have the same length.
        let mut index_removal_unsynced = index::remove(&path)?;
        // Newest first, each made durable, so a crash leaves a contiguous log.
        for segment in removed.iter().rev() {
            remove_segment_file(&segment.path)?;
            sync_dir(&self.dir)?;
            index_removal_unsynced = false;
        }
        if index_removal_unsynced {
            sync_dir(&self.dir)?;
        }
        // The cut is durable before new frames land there, so a crash can
        // never leave old and new frames mixed in one file.
        file.get()
            .and_then(|f| f.set_len(position).and_then(|()| f.sync_data()))
            .map_err(|e| StoreError::io("truncate segment", &path, e))?;
        // Which hard/conf state records survived the cut is not tracked:
        // write fresh copies, so the segment's latest records (which its
        // index will record when it is sealed) are known again. They
        // follow a sync marker for the synced cut, so that recovery knows
        // a bad frame before it is damage, not a lost write.
        let (hs, cs) = {
            let st = self.read_state();
            (st.hard_state.clone(), st.conf_state.clone())
        };
        self.write_records(w, true, Some(hs), Some(cs))
    }
}

/// Cuts a segment file being sealed back to `end`, its last frame's end
/// (dropping preallocated space; the file's real length is asked, since a
/// failed preallocation may have grown it beyond what the log knows), then
/// `fdatasync`s it. Returns the open file.
fn cut_to_end_and_sync(file: &SegmentFile, path: &Path, end: u64) -> Result<Arc<File>, StoreError> {
    file.get()
        .and_then(|f| {
            if f.metadata()?.len() > end {
                f.set_len(end)?;
            }
            f.sync_data().map(|()| f)
        })
        .map_err(|e| StoreError::io("fdatasync segment", path, e))
}

/// Writes the index of a segment being sealed, after checking that the
/// file is as long as the index says (it is, unless a failed write left
/// more behind, and then the storage is poisoned and never rolls). Best
/// effort: without an index, the next open scans the segment.
fn write_index(dir: &Path, path: &Path, file: &File, first_index: u64, end: u64, bytes: &[u8]) {
    match file.metadata() {
        Ok(meta) if meta.len() == end => {}
        Ok(meta) => {
            tracing::warn!(path = %path.display(), len = meta.len(), end, "segment length is not its end; not writing its index");
            return;
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "cannot stat segment; not writing its index");
            return;
        }
    }
    if let Err(err) = index::store(dir, first_index, bytes) {
        tracing::warn!(%err, "cannot write segment index");
    }
}

/// Removes a segment file and its index (if any). Not durable until the
/// directory is fsynced.
pub(crate) fn remove_segment_file(path: &Path) -> Result<(), StoreError> {
    index::remove(path)?;
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::io("remove segment", path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use raft::prelude::Entry;

    use super::*;
    use crate::segment::MARKER_FRAME_LEN;
    use crate::LogOptions;

    fn entries(first: u64, last: u64, term: u64) -> Vec<Entry> {
        (first..=last)
            .map(|index| Entry {
                index,
                term,
                data: b"data".to_vec().into(),
                ..Default::default()
            })
            .collect()
    }

    fn end(store: &GroupStorage) -> u64 {
        store.segments().last().expect("a segment").bytes
    }

    /// A marker claims what a sync began with: never after a truncation
    /// (or roll) overtook the sync, since the bytes it would vouch for may
    /// then be new and unsynced.
    #[test]
    fn a_marker_is_written_only_for_a_claim_nothing_overtook() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let store = GroupStorage::open(dir.path(), LogOptions::default()).expect("open");
        store.append(&entries(1, 10, 1)).expect("append");
        let inner = &store.inner;

        let claim = inner.sync_claim();
        store.append(&entries(5, 5, 2)).expect("conflicting append");
        let before = end(&store);
        let mut w = inner.lock_writer().expect("writer");
        inner.write_marker(&mut w, &claim).expect("marker");
        assert_eq!(end(&store), before, "a truncation overtook the claim");

        let claim = inner.sync_claim();
        inner.write_marker(&mut w, &claim).expect("marker");
        assert_eq!(end(&store), before + MARKER_FRAME_LEN);
        // Already vouched for: nothing more.
        let claim = inner.sync_claim();
        inner.write_marker(&mut w, &claim).expect("marker");
        assert_eq!(end(&store), before + MARKER_FRAME_LEN);
        drop(w);

        // A roll overtook it: the old segment was synced whole when sealed.
        let small = tempfile::TempDir::new().expect("tempdir");
        let store =
            GroupStorage::open(small.path(), LogOptions { segment_bytes: 300 }).expect("open");
        store.append(&entries(1, 3, 1)).expect("append");
        assert_eq!(store.segments().len(), 1);
        let claim = store.inner.sync_claim();
        store.append(&entries(4, 10, 1)).expect("append rolls");
        assert!(store.segments().len() > 1);
        let before = end(&store);
        let mut w = store.inner.lock_writer().expect("writer");
        store.inner.write_marker(&mut w, &claim).expect("marker");
        assert_eq!(end(&store), before);
    }
}
