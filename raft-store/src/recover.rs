//! Opening a group directory: load the snapshot file, drop what an
//! interrupted compaction or `apply_snapshot` left behind, scan every
//! segment (verifying every frame), cut a torn tail off the last segment,
//! and rebuild the in-memory index.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft::prelude::{ConfState, HardState};

use crate::error::StoreError;
use crate::frame::{
    checksum, look_for_intact_frame, split_header, Follows, FrameError, FRAME_HEADER_LEN,
};
use crate::record::{self, Record};
use crate::segment::{parse_segment_file_name, Segment, SegmentHeader, SEGMENT_HEADER_LEN};
use crate::snapfile::{self, sync_dir, SnapshotFile};
use crate::state::LogState;

const SCAN_BUFFER_BYTES: usize = 256 * 1024;

/// What open found: the log state and the next record sequence number.
pub(crate) struct Recovered {
    pub state: LogState,
    pub next_seq: u64,
}

/// The hard state and conf state records with the highest sequence numbers.
struct Latest {
    hard_state: (u64, HardState),
    conf_state: (u64, ConfState),
}

impl Latest {
    fn offer(&mut self, record: Record) {
        match record {
            Record::HardState(seq, hs) if seq >= self.hard_state.0 => self.hard_state = (seq, hs),
            Record::ConfState(seq, cs) if seq >= self.conf_state.0 => self.conf_state = (seq, cs),
            _ => {}
        }
    }
}

/// A segment file whose header has been read.
struct Candidate {
    first_index: u64,
    path: PathBuf,
    file: File,
    header: HeaderState,
}

enum HeaderState {
    Valid(SegmentHeader),
    /// Shorter than a header, or all zeros: created just before a crash.
    Torn,
    Bad(String),
}

pub(crate) fn recover(dir: &Path) -> Result<Recovered, StoreError> {
    fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
    let snap = snapfile::load(dir)?.unwrap_or_else(SnapshotFile::fresh);
    let mut dir_changed = false;
    let candidates = open_candidates(dir, &snap, &mut dir_changed)?;
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
        segments.push(scan_segment(candidate, i + 1 == count, &mut latest)?);
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
            .sync_data()
            .map_err(|e| StoreError::io("fsync segment", &segment.path, e))?;
        segments.push(segment);
        dir_changed = true;
    }
    if dir_changed {
        sync_dir(dir)?;
    }
    finish(dir, snap, segments, latest)
}

fn finish(
    dir: &Path,
    snap: SnapshotFile,
    segments: Vec<Segment>,
    latest: Latest,
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
    Ok(Recovered { state, next_seq })
}

/// Lists the segment files, deleting those an interrupted compaction
/// (named below the log's first index) or `apply_snapshot` (older
/// generation) left, and a torn newest segment.
fn open_candidates(
    dir: &Path,
    snap: &SnapshotFile,
    dir_changed: &mut bool,
) -> Result<Vec<Candidate>, StoreError> {
    let mut found = Vec::new();
    for (first_index, path) in list_segment_files(dir)? {
        if first_index < snap.first_index {
            remove_stale(&path, "below the log's first index", dir_changed)?;
            continue;
        }
        let (file, header) = read_header(&path)?;
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
                file,
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

fn list_segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io("list directory", dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("list directory", dir, e))?;
        let name = entry.file_name();
        if let Some(first_index) = name.to_str().and_then(parse_segment_file_name) {
            out.push((first_index, entry.path()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn remove_stale(path: &Path, why: &str, dir_changed: &mut bool) -> Result<(), StoreError> {
    tracing::warn!(path = %path.display(), "removing segment {why}");
    *dir_changed = true;
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(StoreError::io("remove segment", path, e)),
        _ => Ok(()),
    }
}

fn read_header(path: &Path) -> Result<(File, HeaderState), StoreError> {
    let io_err = |e| StoreError::io("read segment header", path, e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < SEGMENT_HEADER_LEN as u64 {
        return Ok((file, HeaderState::Torn));
    }
    let mut buf = [0; SEGMENT_HEADER_LEN];
    file.read_exact_at(&mut buf, 0).map_err(io_err)?;
    let state = if buf.iter().all(|&b| b == 0) {
        HeaderState::Torn
    } else {
        SegmentHeader::decode(&buf).map_or_else(HeaderState::Bad, HeaderState::Valid)
    };
    Ok((file, state))
}

/// Reads every frame of a segment, indexing entries and offering hard and
/// conf states to `latest`.
fn scan_segment(
    candidate: Candidate,
    is_last: bool,
    latest: &mut Latest,
) -> Result<Segment, StoreError> {
    let Candidate {
        first_index,
        path,
        file,
        header,
    } = candidate;
    let HeaderState::Valid(header) = header else {
        return Err(StoreError::corrupt(path, 0, "invalid segment header"));
    };
    let io_err = |e| StoreError::io("read segment", &path, e);
    let len = file.metadata().map_err(io_err)?.len();
    let file = Arc::new(file);
    let mut reader = BufReader::with_capacity(SCAN_BUFFER_BYTES, &*file);
    reader
        .seek(SeekFrom::Start(SEGMENT_HEADER_LEN as u64))
        .map_err(io_err)?;

    let mut segment = Segment::new(
        first_index,
        path.clone(),
        Arc::clone(&file),
        header.salt,
        len,
    );
    let mut position = SEGMENT_HEADER_LEN as u64;
    let mut payload = Vec::new();
    while position < len {
        match read_frame(&mut reader, len - position, header.salt, &mut payload).map_err(io_err)? {
            Ok(()) => {
                index_record(&mut segment, &payload, position, latest)?;
                position += (FRAME_HEADER_LEN + payload.len()) as u64;
            }
            Err(problem) => {
                cut_torn_tail(&segment, position, len, is_last, problem)?;
                segment.end = position;
                break;
            }
        }
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
        other => {
            latest.offer(other);
            Ok(())
        }
    }
}

/// A bad frame is a torn tail, cut off, only if it is in the last segment
/// and no intact frame follows it; anything else is corruption.
fn cut_torn_tail(
    segment: &Segment,
    position: u64,
    len: u64,
    is_last: bool,
    problem: FrameError,
) -> Result<(), StoreError> {
    let path = &segment.path;
    if !is_last {
        let reason = format!("{problem} in a segment that is not the last");
        return Err(StoreError::corrupt(path, position, reason));
    }
    let mut rest = vec![0; (len - position) as usize];
    segment
        .file
        .read_exact_at(&mut rest, position)
        .map_err(|e| StoreError::io("read segment", path, e))?;
    match look_for_intact_frame(&rest, segment.salt, record::is_known_kind) {
        Follows::Nothing => {}
        Follows::Intact => {
            let reason = format!("{problem}, and intact frames follow it");
            return Err(StoreError::corrupt(path, position, reason));
        }
        Follows::Unknown => {
            let reason = format!(
                "{problem}, and the rest of the segment is too costly to check for intact frames"
            );
            return Err(StoreError::corrupt(path, position, reason));
        }
    }
    tracing::warn!(
        path = %path.display(),
        position,
        dropped_bytes = len - position,
        %problem,
        "truncating torn tail of the log"
    );
    segment
        .file
        .set_len(position)
        .and_then(|()| segment.file.sync_data())
        .map_err(|e| StoreError::io("truncate torn tail", path, e))
}
