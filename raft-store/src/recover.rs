//! Opening a group directory: load the snapshot file, drop what an
//! interrupted compaction or `apply_snapshot` left behind, rebuild the
//! in-memory index, and cut a torn tail off the last segment.
//!
//! Each sealed segment (every one but the last) with a valid index file
//! (see [`crate::index`]) is loaded from it without reading the segment
//! beyond its header. The last segment, and any sealed one without a valid
//! index, is scanned: every frame is read and its checksum verified. A
//! scanned sealed segment gets its index written, so the next open is fast.
//! The cost of open is thus the number of segments, plus the size of the
//! index files (about 4 bytes per entry), plus the size of the last segment.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, HardState};

use crate::durable::create_dir_durable_counted;
use crate::error::StoreError;
use crate::fdcache::SegmentFile;
use crate::frame::{checksum, find_fixed_frames, split_header, FrameError, FRAME_HEADER_LEN};
use crate::index::{self, IndexName, SegmentIndex};
use crate::record::{self, Record, KIND_SYNCED, SYNCED_PAYLOAD_LEN};
use crate::segment::{
    marker_frame, parse_segment_file_name, Segment, SegmentHeader, SEGMENT_HEADER_LEN,
};
use crate::snapfile::{self, sync_dir, SnapshotFile};
use crate::state::LogState;
use crate::OpenStats;

const SCAN_BUFFER_BYTES: usize = 256 * 1024;

/// What open found: the log state and the next record sequence number.
pub(crate) struct Recovered {
    pub state: LogState,
    pub next_seq: u64,
    pub stats: OpenStats,
}

/// The hard state and conf state records with the highest sequence numbers.
struct Latest {
    hard_state: (u64, HardState),
    conf_state: (u64, ConfState),
}

impl Latest {
    fn offer_hard_state(&mut self, seq: u64, hs: &HardState) {
        if seq >= self.hard_state.0 {
            self.hard_state = (seq, hs.clone());
        }
    }

    fn offer_conf_state(&mut self, seq: u64, cs: &ConfState) {
        if seq >= self.conf_state.0 {
            self.conf_state = (seq, cs.clone());
        }
    }

    /// Offers the latest records of a segment loaded from its index.
    fn offer_index(&mut self, index: &SegmentIndex) {
        if let Some((seq, hs)) = &index.hard_state {
            self.offer_hard_state(*seq, hs);
        }
        if let Some((seq, cs)) = &index.conf_state {
            self.offer_conf_state(*seq, cs);
        }
    }
}

/// The files of a group directory that belong to the log.
struct Listing {
    /// Segment files: first index and path, sorted.
    segments: Vec<(u64, PathBuf)>,
    /// First indexes of the `.idx` files.
    indexes: BTreeSet<u64>,
    /// Paths of unfinished index writes (`.idx.tmp`).
    temp_indexes: Vec<PathBuf>,
}

/// A segment file whose header has been read. Its descriptor is closed
/// again: a group may have any number of segments, and open holds at most
/// one of them open at a time outside the descriptor cache.
struct Candidate {
    first_index: u64,
    path: PathBuf,
    len: u64,
    header: HeaderState,
}

enum HeaderState {
    Valid(SegmentHeader),
    /// Shorter than a header, or all zeros: created just before a crash.
    Torn,
    Bad(String),
}

pub(crate) fn recover(dir: &Path) -> Result<Recovered, StoreError> {
    let mut stats = OpenStats::default();
    stats.dirs_synced += create_dir_durable_counted(dir)?;
    let snap = snapfile::load(dir)?.unwrap_or_else(SnapshotFile::fresh);
    // After a crash the page cache survived, the names recovery is about
    // to rely on (the snapshot file's last rename, new segments, index
    // files) may not be durable yet: make them so before acting on them
    // (e.g. deleting segments the snapshot file says are stale).
    sync_dir(dir)?;
    stats.dirs_synced += 1;
    let mut dir_changed = false;
    let listing = list_files(dir)?;
    for tmp in &listing.temp_indexes {
        tracing::warn!(path = %tmp.display(), "removing unfinished index file");
        index::remove_file(tmp)?;
        dir_changed = true;
    }
    let candidates = open_candidates(listing.segments, &snap, &mut dir_changed)?;
    remove_orphan_indexes(dir, &listing.indexes, &candidates, &mut dir_changed)?;
    let mut latest = Latest {
        hard_state: snap.hard_state.clone(),
        conf_state: snap.conf_state.clone(),
    };
    let mut segments: Vec<Segment> = Vec::with_capacity(candidates.len());
    let count = candidates.len();
    for (i, candidate) in candidates.into_iter().enumerate() {
        let expected = segments
            .last()
            .map_or(snap.first_index, |s| s.last_index() + 1);
        if candidate.first_index != expected {
            let reason = format!(
                "segment starts at index {} where {expected} was expected (missing or overlapping segment)",
                candidate.first_index
            );
            return Err(StoreError::corrupt(candidate.path, 0, reason));
        }
        let sealed = i + 1 < count;
        let has_index = listing.indexes.contains(&candidate.first_index);
        let segment = if sealed {
            open_segment(dir, candidate, true, has_index, &mut latest, &mut stats)?
        } else {
            open_last_segment(dir, candidate, has_index, &mut latest, &mut stats)?
        };
        segments.push(segment);
    }
    if stats.indexes_written > 0 {
        dir_changed = true;
    }
    if segments.is_empty() {
        // A fresh group, or a crash inside apply_snapshot after the
        // snapshot file was written: start an empty log after the snapshot.
        let (hs, cs) = (&latest.hard_state, &latest.conf_state);
        let segment = Segment::create(
            dir,
            snap.first_index,
            snap.generation,
            (hs.0, &hs.1),
            (cs.0, &cs.1),
        )?;
        segment
            .file
            .get()
            .and_then(|f| f.sync_data())
            .map_err(|e| StoreError::io("fsync segment", &segment.path, e))?;
        stats.files_synced += 1;
        segments.push(segment);
        dir_changed = true;
    }
    if dir_changed {
        sync_dir(dir)?;
        stats.dirs_synced += 1;
    }
    finish(dir, snap, segments, latest, stats)
}

fn finish(
    dir: &Path,
    snap: SnapshotFile,
    segments: Vec<Segment>,
    latest: Latest,
    stats: OpenStats,
) -> Result<Recovered, StoreError> {
    let next_seq = latest.hard_state.0.max(latest.conf_state.0) + 1;
    let state = LogState {
        segments,
        hard_state: latest.hard_state.1,
        conf_state: latest.conf_state.1,
        snapshot: snap.snapshot,
        prev_term: snap.prev_term,
        generation: snap.generation,
        rewrites: 0,
    };
    if state.last_index() < state.snapshot_index() {
        let reason = format!(
            "log ends at index {} before the snapshot at index {}",
            state.last_index(),
            state.snapshot_index()
        );
        return Err(StoreError::corrupt(dir, 0, reason));
    }
    Ok(Recovered {
        state,
        next_seq,
        stats,
    })
}

/// Lists the segment files, deleting those an interrupted compaction
/// (named below the log's first index) or `apply_snapshot` (older
/// generation) left, and a torn newest segment.
fn open_candidates(
    segment_files: Vec<(u64, PathBuf)>,
    snap: &SnapshotFile,
    dir_changed: &mut bool,
) -> Result<Vec<Candidate>, StoreError> {
    let mut found = Vec::new();
    for (first_index, path) in segment_files {
        if first_index < snap.first_index {
            remove_stale(&path, "below the log's first index", dir_changed)?;
            continue;
        }
        let (len, header) = read_header(&path)?;
        match header {
            HeaderState::Valid(h) if h.generation < snap.generation => {
                remove_stale(&path, "from an older log generation", dir_changed)?;
            }
            HeaderState::Valid(h) if h.generation > snap.generation => {
                let reason = format!(
                    "generation {} is newer than the snapshot's {}",
                    h.generation, snap.generation
                );
                return Err(StoreError::corrupt(path, 0, reason));
            }
            header => found.push(Candidate {
                first_index,
                path,
                len,
                header,
            }),
        }
    }
    // Only the newest segment can have a torn header: one is written right
    // after creating the file, and older segments were synced before a newer
    // one was created. Nothing in it was synced, so nothing in it is lost.
    if matches!(found.last(), Some(c) if matches!(c.header, HeaderState::Torn)) {
        if let Some(torn) = found.pop() {
            remove_stale(&torn.path, "with a torn header", dir_changed)?;
        }
    }
    for candidate in &found {
        match &candidate.header {
            HeaderState::Valid(_) => {}
            HeaderState::Torn => {
                return Err(StoreError::corrupt(
                    &candidate.path,
                    0,
                    "empty segment header",
                ))
            }
            HeaderState::Bad(reason) => {
                return Err(StoreError::corrupt(&candidate.path, 0, reason.clone()))
            }
        }
    }
    Ok(found)
}

fn list_files(dir: &Path) -> Result<Listing, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list directory", dir, e))?;
    let mut listing = Listing {
        segments: Vec::new(),
        indexes: BTreeSet::new(),
        temp_indexes: Vec::new(),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list directory", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(first_index) = parse_segment_file_name(name) {
            listing.segments.push((first_index, entry.path()));
        } else {
            match index::parse_index_file_name(name) {
                Some(IndexName::Index(first_index)) => {
                    listing.indexes.insert(first_index);
                }
                Some(IndexName::Temp(_)) => listing.temp_indexes.push(entry.path()),
                None => {}
            }
        }
    }
    listing.segments.sort_unstable();
    Ok(listing)
}

/// Removes index files whose segment is gone (removed by compaction,
/// truncation or `apply_snapshot`, or just now as stale).
fn remove_orphan_indexes(
    dir: &Path,
    indexes: &BTreeSet<u64>,
    candidates: &[Candidate],
    dir_changed: &mut bool,
) -> Result<(), StoreError> {
    let live: BTreeSet<u64> = candidates.iter().map(|c| c.first_index).collect();
    for &first_index in indexes.difference(&live) {
        let path = dir.join(index::index_file_name(first_index));
        tracing::debug!(path = %path.display(), "removing index of a removed segment");
        index::remove_file(&path)?;
        *dir_changed = true;
    }
    Ok(())
}

fn remove_stale(path: &Path, why: &str, dir_changed: &mut bool) -> Result<(), StoreError> {
    tracing::warn!(path = %path.display(), "removing segment {why}");
    *dir_changed = true;
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::io("remove segment", path, e)),
        _ => Ok(()),
    }
}

/// The file's length and header.
fn read_header(path: &Path) -> Result<(u64, HeaderState), StoreError> {
    let io_err = |e| StoreError::io("read segment header", path, e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < SEGMENT_HEADER_LEN as u64 {
        return Ok((len, HeaderState::Torn));
    }
    let mut buf = [0; SEGMENT_HEADER_LEN];
    file.read_exact_at(&mut buf, 0).map_err(io_err)?;
    let state = if buf.iter().all(|&b| b == 0) {
        HeaderState::Torn
    } else {
        SegmentHeader::decode(&buf).map_or_else(HeaderState::Bad, HeaderState::Valid)
    };
    Ok((len, state))
}

/// The last segment, the active one. It may have an index: written by
/// `seal_for_restart` at a clean stop, or by a roll that a crash
/// interrupted before the next segment existed. Either describes the file
/// synced whole and ending with a sync marker, so open loads it (when it
/// matches the file, as for a sealed segment) instead of scanning. Then,
/// loaded or not, the index goes, durably, before anything changes the
/// segment (see `crate::index`): it will be appended to.
fn open_last_segment(
    dir: &Path,
    candidate: Candidate,
    has_index: bool,
    latest: &mut Latest,
    stats: &mut OpenStats,
) -> Result<Segment, StoreError> {
    let path = candidate.path.clone();
    let indexed_before = stats.segments_indexed;
    let mut segment = open_segment(dir, candidate, false, has_index, latest, stats)?;
    if has_index && index::remove(&path)? {
        sync_dir(dir)?;
        stats.dirs_synced += 1;
    }
    if stats.segments_indexed > indexed_before {
        // Synced whole, but not necessarily ending with a marker (a roll
        // syncs without writing one): vouch for all of it, as for a
        // scanned tail, so that damage a later scan finds is reported as
        // such, not cut as a lost write.
        segment.vouched = 0;
        vouch_for_kept_tail(&mut segment)?;
    }
    Ok(segment)
}

/// Loads a segment from its index if it has a valid one; otherwise scans
/// it (and writes its index if it is sealed).
fn open_segment(
    dir: &Path,
    candidate: Candidate,
    sealed: bool,
    has_index: bool,
    latest: &mut Latest,
    stats: &mut OpenStats,
) -> Result<Segment, StoreError> {
    let Candidate {
        first_index,
        path,
        len,
        header,
    } = candidate;
    let HeaderState::Valid(header) = header else {
        return Err(StoreError::corrupt(path, 0, "invalid segment header"));
    };
    if has_index {
        if let Some(index) = load_index(&path, first_index, &header, len, stats) {
            latest.offer_index(&index);
            stats.segments_indexed += 1;
            let file = SegmentFile::new(path.clone());
            return Ok(Segment::from_index(index, path, file));
        }
    }
    let file = SegmentFile::new(path.clone());
    let empty = Segment::new(first_index, path, file, header.salt, len);
    let mut segment = scan_segment(empty, !sealed, latest, stats)?;
    // What recovery keeps may so far be only in the page cache (a crash
    // that it survived, e.g. `kill -9`): make it durable before the node
    // serves or votes on it. This also makes a cut of the tail durable.
    segment
        .file
        .get()
        .and_then(|f| f.sync_data())
        .map_err(|e| StoreError::io("fdatasync segment", &segment.path, e))?;
    stats.files_synced += 1;
    if !sealed {
        vouch_for_kept_tail(&mut segment)?;
    }
    if sealed {
        // Best effort: without it the next open scans this segment again.
        let bytes = index::encode(&segment, header.generation);
        match index::store(dir, first_index, &bytes) {
            Ok(()) => stats.indexes_written += 1,
            Err(err) => tracing::warn!(%err, "cannot write segment index"),
        }
    }
    Ok(segment)
}

/// The index of a sealed segment, if it has one that decodes and describes
/// the segment file as it is. Any problem only means a scan.
fn load_index(
    path: &Path,
    first_index: u64,
    header: &SegmentHeader,
    len: u64,
    stats: &mut OpenStats,
) -> Option<SegmentIndex> {
    let index_path = index::index_path(path);
    let bytes = match fs::read(&index_path) {
        Ok(bytes) => bytes,
        Err(err) => {
            if err.kind() != ErrorKind::NotFound {
                tracing::warn!(path = %index_path.display(), %err, "cannot read segment index; scanning the segment");
            }
            return None;
        }
    };
    stats.index_bytes_read += bytes.len() as u64;
    let reason = match index::decode(&bytes) {
        Ok(index) => match index.mismatch(first_index, header, len) {
            None => return Some(index),
            Some(reason) => reason,
        },
        Err(reason) => reason,
    };
    tracing::warn!(path = %index_path.display(), %reason, "ignoring segment index; scanning the segment");
    None
}

/// Reads a file sequentially with `pread`.
struct PositionedReader<'a> {
    file: &'a File,
    position: u64,
}

impl Read for PositionedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

/// Reads every frame of `segment` (as yet empty, its `end` the file's
/// length), indexing entries and offering hard and conf states to `latest`.
fn scan_segment(
    mut segment: Segment,
    is_last: bool,
    latest: &mut Latest,
    stats: &mut OpenStats,
) -> Result<Segment, StoreError> {
    let (path, salt, len) = (segment.path.clone(), segment.salt, segment.end);
    let io_err = |e| StoreError::io("read segment", &path, e);
    let file = segment.file.get().map_err(io_err)?;
    let mut reader = BufReader::with_capacity(
        SCAN_BUFFER_BYTES,
        PositionedReader {
            file: &file,
            position: SEGMENT_HEADER_LEN as u64,
        },
    );
    let mut position = SEGMENT_HEADER_LEN as u64;
    let mut payload = Vec::new();
    let mut torn = None;
    while position < len {
        match read_frame(&mut reader, len - position, salt, &mut payload).map_err(io_err)? {
            Ok(()) => {
                index_record(&mut segment, &payload, position, latest)?;
                position += (FRAME_HEADER_LEN + payload.len()) as u64;
            }
            Err(problem) => {
                torn = Some(problem);
                break;
            }
        }
    }
    stats.segments_scanned += 1;
    // Every byte after the header was examined: as frames up to
    // `position`, and the rest (if any) by `cut_torn_tail`.
    stats.bytes_scanned += len.saturating_sub(SEGMENT_HEADER_LEN as u64);
    if let Some(problem) = torn {
        match cut_torn_tail(&segment, position, len, is_last, problem)? {
            Tail::Unused => segment.allocated = len,
            Tail::Cut(cut) => {
                stats.bytes_cut += cut;
                segment.allocated = position;
            }
        }
        segment.end = position;
    }
    Ok(segment)
}

/// Reads the frame at the reader's position into `payload`, `remaining`
/// bytes being left in the file. Never allocates beyond `remaining`.
fn read_frame(
    reader: &mut impl Read,
    remaining: u64,
    salt: u32,
    payload: &mut Vec<u8>,
) -> io::Result<Result<(), FrameError>> {
    if remaining < FRAME_HEADER_LEN as u64 {
        return Ok(Err(FrameError::ShortHeader));
    }
    let mut header = [0; FRAME_HEADER_LEN];
    reader.read_exact(&mut header)?;
    let (len, crc) = split_header(header);
    if len == 0 {
        return Ok(Err(FrameError::Empty));
    }
    if u64::from(len) > remaining - FRAME_HEADER_LEN as u64 {
        return Ok(Err(FrameError::ShortPayload));
    }
    payload.resize(len as usize, 0);
    reader.read_exact(payload)?;
    if checksum(salt, len, payload) != crc {
        return Ok(Err(FrameError::Checksum));
    }
    Ok(Ok(()))
}

fn index_record(
    segment: &mut Segment,
    payload: &[u8],
    position: u64,
    latest: &mut Latest,
) -> Result<(), StoreError> {
    let record = record::decode(payload)
        .map_err(|reason| StoreError::corrupt(&segment.path, position, reason))?;
    match record {
        Record::Entry(meta) => {
            let expected = segment.last_index() + 1;
            if meta.index != expected {
                let reason = format!("entry index {} where {expected} was expected", meta.index);
                return Err(StoreError::corrupt(&segment.path, position, reason));
            }
            segment.push(meta.index, meta.term, position)
        }
        Record::HardState(seq, hs) => {
            latest.offer_hard_state(seq, &hs);
            segment.note_hard_state(seq, &hs);
            Ok(())
        }
        Record::ConfState(seq, cs) => {
            latest.offer_conf_state(seq, &cs);
            segment.note_conf_state(seq, &cs);
            Ok(())
        }
        Record::Synced { upto } => {
            check_marker(&segment.path, position, upto)?;
            segment.note_marker(position, upto);
            Ok(())
        }
    }
}

/// A marker is written after the bytes it vouches for; one that claims
/// more was not written by this crate.
fn check_marker(path: &Path, position: u64, upto: u64) -> Result<(), StoreError> {
    if upto > position {
        let reason = format!("sync marker claims {upto} bytes but lies at byte {position}");
        return Err(StoreError::corrupt(path, position, reason));
    }
    Ok(())
}

/// After open synced the last segment, records that in it with a sync
/// marker (unless one already vouches for everything), so that damage to
/// what recovery kept is never mistaken for a lost write by a later open.
/// Not synced itself: the next `sync` covers it.
fn vouch_for_kept_tail(segment: &mut Segment) -> Result<(), StoreError> {
    if segment.vouched >= segment.end {
        return Ok(());
    }
    let upto = segment.end;
    let frame = marker_frame(segment.salt, upto)?;
    segment
        .file
        .get()
        .and_then(|f| f.write_all_at(&frame, upto))
        .map_err(|e| StoreError::io("write segment", &segment.path, e))?;
    segment.end += frame.len() as u64;
    segment.allocated = segment.allocated.max(segment.end);
    segment.note_marker(upto, upto);
    Ok(())
}

/// What follows the last intact frame of the last segment.
enum Tail {
    /// Zeros only: space the writer preallocated and never wrote (or
    /// writes that never reached the disk). Kept, for the writer to fill.
    Unused,
    /// Anything else, cut off: this many bytes.
    Cut(u64),
}

/// Decides what a bad frame at `position` is. In a sealed segment
/// (synced whole, and cut to its end, before the next one was created) it
/// is corruption. In the last segment it is corruption only if a sync
/// marker after it claims bytes beyond `position`: then the frame was
/// synced and damaged since. Otherwise nothing proves it was ever synced:
/// it, and everything after it, is a never-synced tail (a torn write, or a
/// write that never reached the disk while a later one did), and is cut,
/// unless it is all zeros (preallocated space, see `Inner::grow_ahead`),
/// which is left as it is: zeros are never a frame.
fn cut_torn_tail(
    segment: &Segment,
    position: u64,
    len: u64,
    is_last: bool,
    problem: FrameError,
) -> Result<Tail, StoreError> {
    let path = &segment.path;
    if !is_last {
        let reason = format!("{problem} in a segment that is not the last (synced data)");
        return Err(StoreError::corrupt(path, position, reason));
    }
    let file = segment
        .file
        .get()
        .map_err(|e| StoreError::io("read segment", path, e))?;
    let mut rest = vec![0; (len - position) as usize];
    file.read_exact_at(&mut rest, position)
        .map_err(|e| StoreError::io("read segment", path, e))?;
    for start in find_fixed_frames(&rest, segment.salt, SYNCED_PAYLOAD_LEN, KIND_SYNCED) {
        let at = position + start as u64;
        let payload =
            &rest[start + FRAME_HEADER_LEN..start + FRAME_HEADER_LEN + SYNCED_PAYLOAD_LEN];
        let Ok(Record::Synced { upto }) = record::decode(payload) else {
            continue;
        };
        check_marker(path, at, upto)?;
        if upto > position {
            let reason = format!(
                "{problem} in synced data: a sync marker at byte {at} says the first {upto} bytes were synced"
            );
            return Err(StoreError::corrupt(path, position, reason));
        }
    }
    if rest.iter().all(|&b| b == 0) {
        return Ok(Tail::Unused);
    }
    tracing::warn!(
        path = %path.display(),
        position,
        dropped_bytes = len - position,
        %problem,
        "cutting the never-synced tail of the log"
    );
    file.set_len(position)
        .map_err(|e| StoreError::io("truncate torn tail", path, e))?;
    Ok(Tail::Cut(len - position))
}
