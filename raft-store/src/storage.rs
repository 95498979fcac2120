//! `GroupStorage`: the handle the broker holds for one Raft group, its
//! locks, and `open` / `sync`.
//!
//! Locks, always taken in this order:
//!
//! 1. `sync_lock` — serialises `sync` (and compaction), and is held across
//!    `fdatasync`, so that a `sync` returns only after every write made
//!    before it was called is durable, even a write whose `fdatasync` a
//!    concurrent `sync` had already started. Appends never take it. `sync`
//!    takes the writer twice under it: to collect what to sync (and what
//!    its sync marker will claim), and after `fdatasync` to write that
//!    marker.
//! 2. `writer` — serialises everything that writes (append, hard/conf
//!    state, compaction, snapshots). Writes to the file happen under it
//!    alone, beyond the end readers know about.
//! 3. `state` (`RwLock`) — the index. Writers take it for writing only
//!    briefly, to publish what they wrote; readers hold it for reading only
//!    long enough to locate files and positions, then `pread` outside it.

use std::fmt;
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use raft::prelude::{ConfState, HardState, Snapshot};

use crate::error::StoreError;
use crate::fdcache::SegmentFile;
use crate::recover::{recover, Recovered};
use crate::snapfile::sync_dir;
use crate::state::LogState;
use crate::write::SyncClaim;
use crate::{LogOptions, OpenStats, SegmentInfo};

/// Durable storage for one Raft group, in one directory.
///
/// Cheap to clone (an `Arc` inside); `Send + Sync`. Implements
/// [`raft::Storage`]. Writes (`append`, `set_hard_state`, `set_conf_state`)
/// are not durable until [`GroupStorage::sync`] returns.
#[derive(Clone)]
pub struct GroupStorage {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    open_stats: OpenStats,
    sync_lock: Mutex<()>,
    writer: Mutex<Writer>,
    state: RwLock<LogState>,
    /// Set (once: the first fault is kept) when a read finds data it
    /// cannot serve; see [`GroupStorage::fault`].
    fault: OnceLock<String>,
}

/// State only writers touch.
pub(crate) struct Writer {
    /// Reused encode buffer: one append's frames, written with one `pwrite`.
    pub buf: Vec<u8>,
    /// Reused: the file position of each entry in `buf`.
    pub positions: Vec<u64>,
    next_seq: u64,
    /// Segment files written since the last sync. Their descriptors may
    /// have been evicted since: `sync` reopens them, which is sound (see
    /// [`crate::fdcache`]).
    unsynced: Vec<Arc<SegmentFile>>,
    /// Whether a segment file was created or removed since the last sync.
    pub dir_dirty: bool,
    poisoned: bool,
    /// Whether to grow the active segment ahead of writes; cleared where
    /// the filesystem cannot (see [`Inner::grow_ahead`]).
    pub preallocate: bool,
    /// Whether an index file describes the active segment (written by
    /// `seal_for_restart`): it goes, durably, before the segment changes.
    pub active_index_on_disk: bool,
}

impl Writer {
    /// The next hard-state / conf-state record sequence number.
    pub(crate) fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    pub(crate) fn note_unsynced(&mut self, file: &Arc<SegmentFile>) {
        if !self.unsynced.iter().any(|f| Arc::ptr_eq(f, file)) {
            self.unsynced.push(Arc::clone(file));
        }
    }

    pub(crate) fn forget_unsynced(&mut self) {
        self.unsynced.clear();
        self.dir_dirty = false;
    }

    /// Passes `result` through, poisoning the storage on an I/O error: after
    /// a failed write or fsync the page cache cannot be trusted.
    pub(crate) fn guard<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(result, Err(StoreError::Io { .. })) {
            self.poisoned = true;
        }
        result
    }
}

impl GroupStorage {
    /// Opens (creating it durably if missing, see [`crate::create_dir_durable`])
    /// the group directory `dir`: recovers the log, cutting a never-synced
    /// tail off the last segment and failing with [`StoreError::Corrupt`]
    /// on damage to synced data it reads. Everything it keeps is durable
    /// when it returns (directory and last segment synced), so the caller
    /// may vote and acknowledge on it.
    ///
    /// Sealed segments with a valid index file are not read (see the crate
    /// docs): damage inside them is reported by the reads that meet it.
    pub fn open(dir: &Path, options: LogOptions) -> Result<GroupStorage, StoreError> {
        let Recovered {
            state,
            next_seq,
            stats,
        } = recover(dir)?;
        let writer = Writer {
            buf: Vec::new(),
            positions: Vec::new(),
            next_seq,
            unsynced: Vec::new(),
            dir_dirty: false,
            poisoned: false,
            preallocate: true,
            active_index_on_disk: false,
        };
        let inner = Inner {
            dir: dir.to_path_buf(),
            segment_bytes: options.effective_segment_bytes(),
            open_stats: stats,
            sync_lock: Mutex::new(()),
            writer: Mutex::new(writer),
            state: RwLock::new(state),
            fault: OnceLock::new(),
        };
        Ok(GroupStorage {
            inner: Arc::new(inner),
        })
    }

    /// Why this group must not be served from this directory, if a read
    /// found a frame that fails its checksum or does not decode (or a
    /// segment it could not read): the first such error, as text. Reads
    /// return the error itself ([`StoreError::Corrupt`], or through
    /// [`raft::Storage`] a `raft::Error::Store(StorageError::Other(_))`);
    /// this flag lets the caller that catches raft-rs's panic on such an
    /// error find out why, and take the group out of service. It stays set
    /// for the life of this handle and its clones; reopening re-verifies.
    pub fn fault(&self) -> Option<String> {
        self.inner.fault.get().cloned()
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// What [`GroupStorage::open`] read to recover this group.
    pub fn open_stats(&self) -> OpenStats {
        self.inner.open_stats
    }

    /// Makes every write made before this call durable: `fdatasync` of each
    /// segment written since the last sync, and an fsync of the directory
    /// if a segment was created or removed. Call it before acknowledging
    /// anything or sending Raft's persisted messages. Syncs of different
    /// groups never wait for each other; appends may continue meanwhile.
    ///
    /// Once durable, the active segment's new length is recorded in it by a
    /// sync marker (one small unsynced write), which is what lets recovery
    /// tell damage to synced data from a write that never reached the disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        let _syncing = self.inner.lock_sync();
        let (files, dir_dirty, claim) = {
            let mut w = self.inner.lock_writer()?;
            let claim = self.inner.sync_claim();
            (
                mem::take(&mut w.unsynced),
                mem::take(&mut w.dir_dirty),
                claim,
            )
        };
        let result = self.inner.sync_files(&files, dir_dirty);
        let mut w = self
            .inner
            .writer
            .lock()
            .expect("raft-store writer lock poisoned");
        if result.is_err() {
            w.poisoned = true;
            return result;
        }
        if w.poisoned {
            // Another write failed meanwhile; it reported that itself, and
            // no marker is written to a file in an unknown state.
            return Ok(());
        }
        let result = self.inner.write_marker(&mut w, &claim);
        w.guard(result)
    }

    /// The current hard state (possibly not yet synced).
    pub fn hard_state(&self) -> HardState {
        self.inner.read_state().hard_state.clone()
    }

    /// The current conf state (possibly not yet synced).
    pub fn conf_state(&self) -> ConfState {
        self.inner.read_state().conf_state.clone()
    }

    /// The stored snapshot (default, index 0, if there is none).
    pub fn stored_snapshot(&self) -> Snapshot {
        self.inner.read_state().snapshot.clone()
    }

    /// The segments, oldest first, for choosing a compaction point.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.inner.read_state().segment_infos()
    }
}

impl fmt::Debug for GroupStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupStorage")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn lock_sync(&self) -> MutexGuard<'_, ()> {
        self.sync_lock
            .lock()
            .expect("raft-store sync lock poisoned")
    }

    /// The writer lock, or `Poisoned` after an earlier I/O failure.
    pub(crate) fn lock_writer(&self) -> Result<MutexGuard<'_, Writer>, StoreError> {
        let w = self.writer.lock().expect("raft-store writer lock poisoned");
        if w.poisoned {
            return Err(StoreError::Poisoned);
        }
        Ok(w)
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, LogState> {
        self.state.read().expect("raft-store state lock poisoned")
    }

    pub(crate) fn write_state(&self) -> RwLockWriteGuard<'_, LogState> {
        self.state.write().expect("raft-store state lock poisoned")
    }

    /// What a sync that starts now will have made durable. The caller
    /// holds the writer, so no write is half published.
    pub(crate) fn sync_claim(&self) -> SyncClaim {
        let st = self.read_state();
        let active = st.active();
        SyncClaim {
            file: Arc::clone(&active.file),
            upto: active.end,
            rewrites: st.rewrites,
        }
    }

    /// Records the first fault a read met (see [`GroupStorage::fault`]).
    pub(crate) fn note_fault(&self, err: &StoreError) {
        let mut first = false;
        self.fault.get_or_init(|| {
            first = true;
            err.to_string()
        });
        if first {
            tracing::error!(dir = %self.dir.display(), %err, "group storage faulted: a read met data it cannot serve");
        }
    }

    /// `sync` for callers already holding `sync_lock` and the writer.
    pub(crate) fn sync_locked(&self, w: &mut Writer) -> Result<(), StoreError> {
        let files = mem::take(&mut w.unsynced);
        let dir_dirty = mem::take(&mut w.dir_dirty);
        self.sync_files(&files, dir_dirty)
    }

    fn sync_files(&self, files: &[Arc<SegmentFile>], dir_dirty: bool) -> Result<(), StoreError> {
        for file in files {
            // A segment removed since it was written (a truncated suffix)
            // holds nothing to make durable.
            if file.is_retired() {
                continue;
            }
            match file.get().and_then(|f| f.sync_data()) {
                Ok(()) => {}
                Err(e) if crate::fdcache::is_retired(&e) => {}
                Err(e) => return Err(StoreError::io("fdatasync segment", file.path(), e)),
            }
        }
        if dir_dirty {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}
