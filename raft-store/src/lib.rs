//! Durable storage for one Raft group: [`raft::Storage`] on a segmented,
//! append-only log in one directory per group.
//!
//! # What this crate owns
//!
//! Durability of everything Raft needs to survive a crash: log entries,
//! hard state, conf state, and the latest snapshot. The broker runs many
//! groups (one per partition, plus metadata), each with its own
//! [`GroupStorage`] in its own directory. No networking, no topics: an
//! entry's data is opaque bytes (for the broker, one record batch).
//!
//! # Invariants
//!
//! - **Nothing is durable until [`GroupStorage::sync`] returns.** `append`,
//!   `set_hard_state` and `set_conf_state` only write to the page cache;
//!   `sync` `fdatasync`s every segment written since the last sync (and the
//!   directory if a segment was created or removed). The broker persists a
//!   whole Raft `Ready` (entries, then hard state) and calls `sync` once
//!   before it sends persisted messages or acknowledges anything.
//! - **Hard state and conf state are records in the log**, so one
//!   `fdatasync` covers entries and hard state per round. Each record has a
//!   sequence number; on open the highest wins. A new segment starts with
//!   copies of the current ones, so unlinking old segments never loses them.
//! - **Never serve a flipped bit.** Every frame carries a CRC32C, verified
//!   on every read, and on open for the frames open reads (the last
//!   segment, and sealed segments without a valid index; see *Opening*).
//! - **Only the last segment can have a torn tail**: a segment is
//!   `fdatasync`ed before the next one is created. On open, a bad frame in
//!   the last segment with no intact frame after it is a torn write and is
//!   cut off (logged with `tracing::warn!`); any other bad frame, a bad
//!   header, or a gap between segments is [`StoreError::Corrupt`].
//! - **Truncating a conflicting suffix is durable before new entries land**:
//!   the current hard/conf state go to the snapshot file first (the cut may
//!   hold the only copy of the latest ones), later segments are unlinked
//!   newest first, and the cut is `fdatasync`ed. Conflicts are rare (leader
//!   changes), so the extra syncs cost little.
//! - **Snapshots commit by rename.** `compact` and `apply_snapshot` write
//!   the `snapshot` file atomically (temp, fsync, rename, fsync dir) before
//!   touching segments; on open, segments named below the recorded first
//!   index, or of an older generation, are leftovers and are deleted.
//! - **An index file is trusted only for the segment it describes**, and
//!   is removed before that segment changes or goes: a missing or invalid
//!   index only means "scan this segment". See *Opening*.
//! - Entries at or below the snapshot index are committed and are never
//!   overwritten (`append` refuses to start there).
//!
//! # Opening
//!
//! A segment is *sealed* when the writer rolls past it: it is
//! `fdatasync`ed, then its in-memory index is written to a sidecar file
//! `{first_index:020}.idx` (temp file, fsync, rename; the directory fsync
//! rides on the one the new segment needs), then the next segment is
//! created. The index holds the segment's salt and generation, its length,
//! its first index, each entry's frame offset, the term runs, and the
//! hard-state and conf-state records with the highest sequence numbers in
//! the segment, all under one CRC32C.
//!
//! [`GroupStorage::open`] reads each segment's 32-byte header and length.
//! Every segment but the last is loaded from its index if the index
//! decodes, its checksum matches, and its first index, salt, generation and
//! length equal the segment file's; its frames are not read. The last
//! segment (the active one, the only one that can have a torn tail) is
//! always scanned, every frame checksummed; so is a sealed segment without
//! a valid index (a log written before indexes existed, or an index lost in
//! a crash), which then gets its index written. Open thus costs one header
//! read per segment, plus the index files (about 4 bytes per entry), plus
//! the last segment, whatever the size of the log;
//! [`GroupStorage::open_stats`] reports what it read.
//!
//! What is verified when: a sealed segment loaded from its index is not
//! read on open, so bit rot inside it is found by the first read of the
//! damaged frame ([`StoreError::Corrupt`]), never served. Terms come from
//! the index (checked when it was written, and covered by its checksum).
//! A sealed segment without a valid index, and the last segment, are
//! verified on open as before: a bad frame in the middle is `Corrupt`.
//!
//! Why an index can never be stale:
//!
//! - It is written only for a synced segment that no longer changes, after
//!   checking the file's length is the length it records.
//! - Truncating a conflicting suffix into a sealed segment makes it active
//!   again: its index is unlinked, and the directory fsynced, *before* the
//!   cut, so no crash can bring the old index back for a file that may
//!   later have the same length again. The segment then gets fresh copies
//!   of the current hard and conf state, so its latest records are known
//!   exactly when it is sealed again.
//! - Open removes (durably, before touching the file) an index of the last
//!   segment, left by a crash between sealing a segment and creating the
//!   next: the last segment may be cut and will be appended to.
//! - Compaction, `apply_snapshot` and suffix truncation remove the indexes
//!   of the segments they remove; open removes indexes whose segment is
//!   gone, and unfinished `*.idx.tmp` files.
//! - The salt (random per segment file) and generation in the index must
//!   match the segment header, so an index never applies to another file
//!   of the same name, e.g. a segment recreated after a truncation.
//!
//! # On-disk format
//!
//! A group directory holds segment files `{first_index:020}.log`, named
//! after the index of the first entry they hold, an index file
//! `{first_index:020}.idx` for each sealed segment (`.idx.tmp` while one is
//! being written), and optionally a `snapshot` file (`snapshot.tmp` while
//! one is being written). All integers are little-endian.
//!
//! ```text
//! segment  = header (32 bytes) frame*
//! header   = "COVETLOG" | version u32 | salt u32 | generation u64 | 0 u32 | crc u32
//! frame    = len u32 | crc u32 | payload (len bytes)
//!            crc = CRC32C seeded with the salt, over len ++ payload
//! payload  = 1 | entry_type u8 | term u64 | index u64 | context_len u32 | context | data
//!          | 2 | seq u64 | term u64 | vote u64 | commit u64                 (hard state)
//!          | 3 | seq u64 | auto_leave u8 | 4 × (count u32 | count × u64)   (conf state:
//!              voters, learners, voters_outgoing, learners_next)
//! snapshot = "COVETSNP" | version u32 | crc u32 | generation u64 | first_index u64
//!            | prev_term u64 | hard state with seq | conf state with seq
//!            | snapshot index u64 | snapshot term u64 | snapshot conf state | data
//! index    = "COVETIDX" | version u32 | first_index u64 | salt u32 | generation u64
//!            | segment_len u64 | entry_count u64
//!            | 0 | 1 hard state with seq | 0 | 1 conf state with seq   (latest in the segment)
//!            | run_count u32 | run_count × (first index u64 | term u64)
//!            | entry_count × frame offset u32 | crc u32 (CRC32C of all before it)
//! ```
//!
//! The salt (random per segment) keeps bytes inside entry data, which
//! producers control, from ever passing for a frame during recovery. Entry
//! fields are written by hand, not as protobuf, so a read slices `data` out
//! of its read buffer as `Bytes` without copying.
//!
//! # Concurrency
//!
//! [`GroupStorage`] is `Clone + Send + Sync`. Writes are serialised per
//! group; [`GroupStorage::read`] may run on any thread concurrently with
//! appends: it holds a read lock only to locate files and positions, then
//! reads with `pread` outside it (if a suffix truncation rewrote what it was
//! reading, it retries, and after a few retries reads under the lock).
//! Each write call issues one `pwrite`, with no user-space buffer across
//! calls, so whatever `append` returned from is readable at once. Syncs of
//! different groups are independent; within a group, appends go on while
//! a `sync` waits for `fdatasync`.
//!
//! # Known limits
//!
//! - Open reads every sealed segment's header and index file, and all of
//!   the last segment: time grows with the number of segments and entries
//!   (4 bytes of index each), not with the bytes of sealed segments, but a
//!   large `segment_bytes` makes the last segment's scan longer.
//! - Bit rot in a sealed segment with an index is found when the damaged
//!   entry is read, not on open. Nothing scrubs segments in the background.
//! - Sealing a segment costs an extra fsync (of its index file) on the
//!   append that rolls. Index writes are best effort: if one fails (logged),
//!   the next open scans that segment and writes it.
//! - The index keeps 4 bytes per entry in memory (plus term runs): about
//!   0.4 % of the log for 1 KiB entries, and as much again on disk in the
//!   index files. There is no time → index index yet.
//! - Every segment keeps an open file descriptor (for `pread`); a broker
//!   with many partitions needs a matching descriptor limit.
//! - A bit flip in the very last frame of the log is indistinguishable from
//!   a torn write and is cut off rather than reported (losing that one
//!   entry even if it was synced).
//! - Telling a torn tail from mid-log damage scans the rest of the last
//!   segment for intact frames; the checksum work is capped (entry data
//!   could be crafted to make it quadratic), and past the cap open reports
//!   `Corrupt` rather than guess.
//! - Nothing stops two processes from opening the same directory.
//! - Segments hold at most ~4 GiB of frame starts; `segment_bytes` is
//!   clamped to [`MAX_SEGMENT_BYTES`].

#![warn(missing_docs)]

mod compact;
mod durable;
mod error;
mod frame;
mod index;
mod raft_storage;
mod read;
mod record;
mod recover;
mod segment;
mod snapfile;
mod state;
mod storage;
mod write;

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

pub use error::StoreError;
pub use storage::GroupStorage;

/// Default [`LogOptions::segment_bytes`]: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Upper bound on [`LogOptions::segment_bytes`]: 1 GiB, so that frame
/// positions fit the index's 32-bit offsets.
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Options for one group's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Roll to a new segment once the active one holds at least one entry
    /// and at least this many bytes. Clamped to `1..=MAX_SEGMENT_BYTES`.
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

impl LogOptions {
    pub(crate) fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.clamp(1, MAX_SEGMENT_BYTES)
    }
}

/// One segment of a group's log, as reported by [`GroupStorage::segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Index of the first entry the segment holds (or will hold).
    pub first_index: u64,
    /// Index of its last entry; `first_index - 1` if it holds none.
    pub last_index: u64,
    /// Its size on disk, in bytes.
    pub bytes: u64,
}

/// What [`GroupStorage::open`] read to rebuild the log's in-memory index,
/// as reported by [`GroupStorage::open_stats`].
///
/// A healthy directory opens with `segments_scanned == 1` (the last
/// segment) and every other segment in `segments_indexed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenStats {
    /// Sealed segments loaded from their index file, without reading their
    /// frames.
    pub segments_indexed: usize,
    /// Segments whose every frame was read and checksummed: the last one,
    /// and sealed ones without a valid index file.
    pub segments_scanned: usize,
    /// Bytes read from segment files by those scans (headers not counted).
    pub bytes_scanned: u64,
    /// Bytes of index files read.
    pub index_bytes_read: u64,
    /// Index files written for scanned sealed segments that had none (or
    /// an invalid one).
    pub indexes_written: usize,
    /// Segment files open `fdatasync`ed.
    pub files_synced: usize,
    /// Directories open fsynced.
    pub dirs_synced: usize,
    /// Bytes cut off the end of the last segment.
    pub bytes_cut: u64,
}

/// Creates the directory `path` and any missing ancestors so that they
/// survive a power cut: each new directory's parent is fsynced after it is
/// created, and if `path` already existed its parent is fsynced anyway (an
/// earlier run may have crashed before doing so). Nothing in a directory
/// is durable until the directory itself is, so call it before relying on
/// anything stored under `path` (the broker: its `state/`, `groups/` and
/// sled directories). [`GroupStorage::open`] does this for a group's
/// directory.
pub fn create_dir_durable(path: &Path) -> Result<(), StoreError> {
    durable::create_dir_durable_counted(path).map(drop)
}

/// Removes a group's directory and everything in it (topic deletion).
/// Drop every [`GroupStorage`] of the group first. A missing directory is
/// not an error.
///
/// The directory is first renamed to `<dir>.deleted` and the rename made
/// durable, so a crash mid-way never leaves a half-removed log that would
/// open as corrupt: the group is either whole or gone. [`remove_leftovers`]
/// finishes removals a crash interrupted.
pub fn destroy(dir: &Path) -> Result<(), StoreError> {
    let doomed = deleted_name(dir);
    remove_tree(&doomed)?;
    match fs::rename(dir, &doomed) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("rename directory", dir, e)),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        snapfile::sync_dir(parent)?;
    }
    remove_tree(&doomed)
}

/// Removes every `*.deleted` directory under `parent`: group removals that
/// a crash interrupted after the rename.
pub fn remove_leftovers(parent: &Path) -> Result<(), StoreError> {
    let entries = match fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("read directory", parent, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("read directory", parent, e))?;
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(DELETED_SUFFIX)
        {
            remove_tree(&entry.path())?;
        }
    }
    Ok(())
}

const DELETED_SUFFIX: &str = ".deleted";

fn deleted_name(dir: &Path) -> std::path::PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(DELETED_SUFFIX);
    name.into()
}

fn remove_tree(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("remove directory", dir, e)),
    }
}
