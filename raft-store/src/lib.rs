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
//! The full contract (what is synced when, what recovery trusts) is
//! `docs/adr/0006-durability-contract.md`; in short:
//!
//! - **Nothing is durable until [`GroupStorage::sync`] returns.** `append`,
//!   `set_hard_state` and `set_conf_state` only write to the page cache;
//!   `sync` `fdatasync`s every segment written since the last sync (and the
//!   directory if a segment was created or removed). The broker persists a
//!   whole Raft `Ready` (entries, then hard state) and calls `sync` once
//!   before it sends persisted messages or acknowledges anything.
//! - **A sync leaves a mark.** Once its `fdatasync` returned, `sync`
//!   appends a *sync marker* to the active segment: a small record saying
//!   "the first `upto` bytes of this file are durable". It is not synced
//!   itself (the next round's sync covers it), so it costs one small
//!   `pwrite` per sync and no extra `fdatasync`. A suffix truncation (whose
//!   cut is synced) and open (which syncs what it keeps) write one too. A
//!   marker only ever claims bytes a completed sync covered, and lies after
//!   them.
//! - **Hard state and conf state are records in the log**, so one
//!   `fdatasync` covers entries and hard state per round. Each record has a
//!   sequence number; on open the highest wins. A new segment starts with
//!   copies of the current ones, so unlinking old segments never loses them.
//! - **Never serve a flipped bit.** Every frame carries a CRC32C, verified
//!   on every read, and on open for the frames open reads (the last
//!   segment, and sealed segments without a valid index; see *Opening*). A
//!   read that meets a bad frame returns [`StoreError::Corrupt`] (never
//!   panics) and marks the group faulted ([`GroupStorage::fault`]).
//! - **Open makes durable everything it keeps, before it returns**: it
//!   creates the group directory durably (fsyncing each new directory's
//!   parent, and the parent of an existing one), fsyncs the directory
//!   before acting on the names in it (the snapshot file's last rename may
//!   still be only in the page cache after a `kill -9`), `fdatasync`s the
//!   last segment (after cutting its tail) and every segment it scanned,
//!   and fsyncs the directory again after removing or writing files. So a
//!   node never votes or acknowledges on the strength of writes that only a
//!   crash-surviving page cache held. [`OpenStats`] counts those syncs.
//! - **Only a never-synced tail is cut; damage to synced data is
//!   [`StoreError::Corrupt`].** A sealed segment was `fdatasync`ed whole
//!   before the next one was created, so any bad frame in it is corruption.
//!   In the last segment, a bad frame is corruption only if an intact sync
//!   marker after it claims bytes beyond it (the frame was synced, and
//!   damaged since). Otherwise nothing proves it was ever synced: it is a
//!   torn write, or a write that never reached the disk although a later
//!   one did (unsynced writes reach the disk in any order on XFS, ext4
//!   `data=writeback`, or through a drive's volatile cache), and open cuts
//!   the segment there (logged with `tracing::warn!`, counted in
//!   [`OpenStats::bytes_cut`]). A torn (short or all-zero) header of the
//!   newest segment is such a tail too: the segment is removed. A cut never
//!   removes a hard or conf state that was synced: records past the cut
//!   were not synced (barring the first of the *Known limits*), and every
//!   older record (earlier in the segment, in
//!   sealed segments, in the snapshot file) is kept and competes by
//!   sequence number as before.
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
//! scanned, every frame checksummed, unless a clean stop left its index
//! (see below); so is a sealed segment without
//! a valid index (a log written before indexes existed, or an index lost in
//! a crash), which then gets its index written. Open thus costs one header
//! read per segment, plus the index files (about 4 bytes per entry), plus
//! the last segment after a crash, whatever the size of the log;
//! [`GroupStorage::open_stats`] reports what it read.
//!
//! What is verified when: a sealed segment loaded from its index is not
//! read on open, so bit rot inside it is found by the first read of the
//! damaged frame ([`StoreError::Corrupt`], and the group is faulted), never
//! served. Terms come from the index (checked when it was written, and
//! covered by its checksum). A sealed segment without a valid index is
//! verified on open: any bad frame is `Corrupt`. The last segment, unless
//! loaded from a clean stop's index (then it is like a sealed one), is
//! verified on open, and a bad frame in it is either cut (a never-synced
//! tail) or `Corrupt` (a sync marker after it vouches for it): see
//! *Invariants*. An index rebuilt from a scanned sealed segment therefore
//! describes verified, synced bytes.
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
//! - The last segment has an index only after a clean stop
//!   ([`GroupStorage::seal_for_restart`]: synced, cut to its last frame, a
//!   sync marker vouching for all of it) or a crash between sealing a
//!   segment and creating the next. Open loads it like a sealed segment's
//!   (if it matches the file), then removes it durably before returning:
//!   the segment will be appended to. A write after `seal_for_restart` on
//!   the same handle removes it durably first.
//! - Compaction, `apply_snapshot` and suffix truncation remove the indexes
//!   of the segments they remove; open removes indexes whose segment is
//!   gone, and unfinished `*.idx.tmp` files.
//! - The salt (random per segment file) and generation in the index must
//!   match the segment header, so an index never applies to another file
//!   of the same name, e.g. a segment recreated after a truncation.
//!
//! # Preallocation
//!
//! The active segment's file is grown ahead of its last frame with
//! `fallocate` (1 MiB at a time, never past the roll size), so that the
//! `fdatasync` of an append into that space does not also write the inode
//! for a new file size: on ext4 that takes ~35 µs off every sync of a small
//! append. The space reads as zeros, and a frame never has length zero, so
//! recovery finds the end of the frames there; a tail of nothing but zeros
//! is kept as unused space (not counted in [`OpenStats::bytes_cut`]),
//! anything else after the last intact frame is cut as before. Only the
//! last segment has unused space: a roll cuts the file back to its last
//! frame before it syncs and seals it. Where the filesystem cannot
//! preallocate, the log simply appends.
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
//!          | 4 | upto u64                                            (sync marker)
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
//! reading, or a segment it located was removed, it retries, and after a
//! few retries reads under the lock). The descriptor cache has one lock,
//! held only to look a file up or insert it, never across an `open` or an
//! I/O call.
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
//! - Segment files are opened through a process-wide cache of at most
//!   [`max_open_files`] descriptors (default [`DEFAULT_MAX_OPEN_FILES`],
//!   set with [`set_max_open_files`]), least recently used closed first;
//!   an operation holds its file open while it runs, so the process may
//!   briefly hold one more per operation in flight. A group whose file was
//!   evicted pays an `open` on its next read or write; a working set
//!   larger than the cache (many groups read and written at once) reopens
//!   files often. Directories are opened only to be fsynced.
//! - Damage to bytes that the last sync before a crash covered, when that
//!   sync's marker did not reach the disk (a power cut right after the
//!   sync), cannot be told from a lost write: the tail is cut from the bad
//!   frame on, losing synced data. It takes a fault of the medium and a
//!   power cut within the page cache's writeback delay; `kill -9` alone
//!   never loses the marker.
//! - A newest segment whose header holds garbage (not zeros) is reported
//!   `Corrupt` even if it was never synced: without the header's salt no
//!   frame in it can be checked. Stale blocks exposed after a power cut
//!   (ext4 `data=writeback`) could likewise hold an old sync marker of the
//!   same file (from before a truncation) and make open report `Corrupt`
//!   for a never-synced tail. Both cost availability (the replica is
//!   rebuilt from its peers), never safety.
//! - Finding the sync markers after a bad frame reads the rest of the last
//!   segment once and checksums only candidates of the marker's fixed
//!   length: linear in the segment's size.
//! - A sync marker per sync adds 17 bytes to the log per Raft round.
//! - Nothing stops two processes from opening the same directory (open
//!   may write: a cut, a marker, index files).
//! - Segments hold at most ~4 GiB of frame starts; `segment_bytes` is
//!   clamped to [`MAX_SEGMENT_BYTES`].

#![warn(missing_docs)]

mod compact;
mod durable;
mod error;
mod fdcache;
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
pub use fdcache::{
    max_open_files, open_files, set_max_open_files, SegmentFile as CachedFile,
    DEFAULT_MAX_OPEN_FILES,
};
pub use storage::GroupStorage;
pub use write::SEAL_ON_STOP_MIN_BYTES;

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
/// and what it synced and cut, as reported by [`GroupStorage::open_stats`].
///
/// A healthy directory opens with `segments_scanned == 1` (the last
/// segment), every other segment in `segments_indexed`, `files_synced ==
/// 1` (the last segment), `dirs_synced == 2` (the group directory's parent
/// and the group directory) and `bytes_cut == 0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenStats {
    /// Sealed segments loaded from their index file, without reading their
    /// frames.
    pub segments_indexed: usize,
    /// Segments whose every frame was read and checksummed: the last one,
    /// and sealed ones without a valid index file.
    pub segments_scanned: usize,
    /// Bytes of segment files examined by those scans, up to each file's
    /// length (unused preallocated space included, headers not).
    pub bytes_scanned: u64,
    /// Bytes of index files read.
    pub index_bytes_read: u64,
    /// Index files written for scanned sealed segments that had none (or
    /// an invalid one).
    pub indexes_written: usize,
    /// Segment files open `fdatasync`ed: the last one, sealed ones it
    /// scanned, and one it created for an empty log.
    pub files_synced: usize,
    /// Directory fsyncs open issued: new directories into their parents
    /// (or the existing group directory into its parent), the group
    /// directory before recovery relies on its names, and again after
    /// recovery created or removed files in it.
    pub dirs_synced: usize,
    /// Bytes of never-synced tail cut off the last segment (a torn write,
    /// or writes after one that never reached the disk). Not counting a
    /// newest segment removed for its torn header.
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

/// fsyncs directory `dir`, making the names created, renamed or removed in
/// it durable (for directories whose files another library creates, such
/// as sled's).
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    durable::sync_dir(dir)
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
