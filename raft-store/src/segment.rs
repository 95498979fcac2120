//! One segment file: its header, its name, and its in-memory index.
//!
//! Segment header, 32 bytes (integers little-endian):
//!
//! ```text
//! magic "COVETLOG" | version u32 = 1 | salt u32 | generation u64 | reserved u32 = 0
//! | crc u32 (CRC32C of the 28 bytes before it)
//! ```
//!
//! The header is followed by frames (see [`crate::frame`]). The file is
//! named `{first_index:020}.log` after the index of the first entry it holds
//! (or will hold: a new segment starts with no entries). Once sealed, a
//! segment may have a sidecar index file `{first_index:020}.idx` (see
//! [`crate::index`]).

use std::collections::hash_map::RandomState;
use std::fs::OpenOptions;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use raft::prelude::{ConfState, HardState};

use crate::error::StoreError;
use crate::fdcache::SegmentFile;
use crate::frame::{put_frame, FRAME_HEADER_LEN};
use crate::index::SegmentIndex;
use crate::record::{put_conf_state, put_hard_state, put_synced, SYNCED_PAYLOAD_LEN};

pub(crate) const SEGMENT_HEADER_LEN: usize = 32;

/// Bytes of a sync marker's frame.
pub(crate) const MARKER_FRAME_LEN: u64 = (FRAME_HEADER_LEN + SYNCED_PAYLOAD_LEN) as u64;
const MAGIC: &[u8; 8] = b"COVETLOG";
const VERSION: u32 = 1;

/// The decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    /// Seeds every frame checksum in this segment.
    pub salt: u32,
    /// The log generation this segment belongs to. `apply_snapshot` starts
    /// a new generation; recovery deletes segments of older ones.
    pub generation: u64,
}

impl SegmentHeader {
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut out = [0; SEGMENT_HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.salt.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32c::crc32c(&out[..28]);
        out[28..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(buf: &[u8; SEGMENT_HEADER_LEN]) -> Result<Self, String> {
        let field =
            |at: usize| u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        if crc32c::crc32c(&buf[..28]) != field(28) {
            return Err("segment header checksum mismatch".into());
        }
        if &buf[..8] != MAGIC {
            return Err("not a segment file (bad magic)".into());
        }
        if field(8) != VERSION {
            return Err(format!("unsupported segment version {}", field(8)));
        }
        let mut generation = [0; 8];
        generation.copy_from_slice(&buf[16..24]);
        Ok(SegmentHeader {
            salt: field(12),
            generation: u64::from_le_bytes(generation),
        })
    }
}

pub(crate) fn segment_file_name(first_index: u64) -> String {
    format!("{first_index:020}.log")
}

/// The first index encoded in a segment file name, if it is one.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    parse_numbered_name(name, ".log")
}

/// The number in a name `{n:020}{suffix}`, if `name` is one.
pub(crate) fn parse_numbered_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment and its in-memory index.
///
/// The index holds one point per entry: the frame's byte offset as a `u32`
/// (segments stay far below 4 GiB, see `LogOptions`), plus the terms as
/// runs of `(first index, term)`, since terms change rarely. Broker entries
/// are record batches of 1 KiB–1 MiB, so this costs at most 4 bytes per KiB
/// of log (0.4 %), and a read knows each entry's exact start and extent
/// without scanning. A sparser index would save memory only for tiny
/// entries, at the price of scanning frames on every read.
///
/// It also remembers the hard-state and conf-state records with the highest
/// sequence numbers in the file, which the segment's index file records so
/// that open can find the latest ones without reading the segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub first_index: u64,
    pub path: PathBuf,
    /// Opened on demand through the process-wide cache (see
    /// [`crate::fdcache`]); compared by pointer to tell segments apart.
    pub file: Arc<SegmentFile>,
    pub salt: u32,
    /// Where the next frame goes: the end of what was written.
    pub end: u64,
    /// The file's length as far as this process knows: at least `end`.
    /// The active segment's file is grown ahead of `end` with
    /// [`preallocate`], so that a sync after an append into that space
    /// does not have to write the inode for a new file size. Sealed
    /// segments are cut back to `end` when they are sealed.
    pub allocated: u64,
    offsets: Vec<u32>,
    terms: Vec<(u64, u64)>,
    /// The hard-state record with the highest sequence number in the file.
    latest_hard_state: Option<(u64, HardState)>,
    /// The conf-state record with the highest sequence number in the file.
    latest_conf_state: Option<(u64, ConfState)>,
    /// The file's first `vouched` bytes need no new sync marker: a marker
    /// in the file says they are durable, or they end with a marker that
    /// vouches for everything before it. Meaningful for the active segment.
    pub vouched: u64,
}

impl Segment {
    pub(crate) fn new(
        first_index: u64,
        path: PathBuf,
        file: Arc<SegmentFile>,
        salt: u32,
        end: u64,
    ) -> Self {
        Segment {
            first_index,
            path,
            file,
            salt,
            end,
            allocated: end,
            offsets: Vec::new(),
            terms: Vec::new(),
            latest_hard_state: None,
            latest_conf_state: None,
            vouched: 0,
        }
    }

    /// A sealed segment as its index file describes it. The caller has
    /// checked that the index matches the file (see [`crate::index`]).
    pub(crate) fn from_index(index: SegmentIndex, path: PathBuf, file: Arc<SegmentFile>) -> Self {
        Segment {
            first_index: index.first_index,
            path,
            file,
            salt: index.salt,
            end: index.segment_len,
            allocated: index.segment_len,
            offsets: index.offsets,
            terms: index.terms,
            latest_hard_state: index.hard_state,
            latest_conf_state: index.conf_state,
            // Sealed, hence synced whole.
            vouched: index.segment_len,
        }
    }

    /// Creates the file `dir/{first_index:020}.log` (it must not exist) and
    /// writes the header followed by the current hard state and conf state,
    /// so that older segments can be unlinked without losing them. Not synced.
    pub(crate) fn create(
        dir: &Path,
        first_index: u64,
        generation: u64,
        hs: (u64, &HardState),
        cs: (u64, &ConfState),
    ) -> Result<Segment, StoreError> {
        let path = dir.join(segment_file_name(first_index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io("create segment", &path, e))?;
        let header = SegmentHeader {
            salt: random_salt(first_index),
            generation,
        };
        let mut buf = header.encode().to_vec();
        put_frame(&mut buf, header.salt, |b| {
            put_hard_state(b, hs.0, hs.1);
            Ok(())
        })?;
        put_frame(&mut buf, header.salt, |b| {
            put_conf_state(b, cs.0, cs.1);
            Ok(())
        })?;
        file.write_all_at(&buf, 0)
            .map_err(|e| StoreError::io("write segment", &path, e))?;
        let mut segment = Segment::new(
            first_index,
            path.clone(),
            SegmentFile::with_open(path, file),
            header.salt,
            buf.len() as u64,
        );
        segment.note_hard_state(hs.0, hs.1);
        segment.note_conf_state(cs.0, cs.1);
        Ok(segment)
    }

    /// The frame offsets of the entries, one per entry.
    pub(crate) fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    /// The term runs: `(first index, term)`, one per change of term.
    pub(crate) fn term_runs(&self) -> &[(u64, u64)] {
        &self.terms
    }

    /// The hard-state record with the highest sequence number in the file.
    pub(crate) fn latest_hard_state(&self) -> Option<&(u64, HardState)> {
        self.latest_hard_state.as_ref()
    }

    /// The conf-state record with the highest sequence number in the file.
    pub(crate) fn latest_conf_state(&self) -> Option<&(u64, ConfState)> {
        self.latest_conf_state.as_ref()
    }

    /// Notes a hard-state record written to (or found in) the file.
    pub(crate) fn note_hard_state(&mut self, seq: u64, hs: &HardState) {
        if self
            .latest_hard_state
            .as_ref()
            .is_none_or(|&(s, _)| seq >= s)
        {
            self.latest_hard_state = Some((seq, hs.clone()));
        }
    }

    /// Notes a conf-state record written to (or found in) the file.
    pub(crate) fn note_conf_state(&mut self, seq: u64, cs: &ConfState) {
        if self
            .latest_conf_state
            .as_ref()
            .is_none_or(|&(s, _)| seq >= s)
        {
            self.latest_conf_state = Some((seq, cs.clone()));
        }
    }

    /// Notes a sync marker at byte `position` claiming that the first
    /// `upto` (≤ `position`) bytes are durable.
    pub(crate) fn note_marker(&mut self, position: u64, upto: u64) {
        let vouched = if upto == position {
            // Nothing unvouched lies between the claim and the marker.
            position + MARKER_FRAME_LEN
        } else {
            upto
        };
        self.vouched = self.vouched.max(vouched);
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// The last entry's index, or `first_index - 1` if there is none.
    pub(crate) fn last_index(&self) -> u64 {
        self.first_index + self.entry_count() - 1
    }

    pub(crate) fn contains(&self, index: u64) -> bool {
        index >= self.first_index && index <= self.last_index()
    }

    /// The term of entry `index`, which must be in this segment.
    pub(crate) fn term(&self, index: u64) -> Option<u64> {
        if !self.contains(index) {
            return None;
        }
        let run = self.terms.partition_point(|&(start, _)| start <= index);
        self.terms.get(run.checked_sub(1)?).map(|&(_, term)| term)
    }

    /// Where entry `index`'s frame starts. `index` may be `last_index + 1`,
    /// which gives the end of the file.
    pub(crate) fn position(&self, index: u64) -> u64 {
        let slot = (index - self.first_index) as usize;
        self.offsets.get(slot).map_or(self.end, |&p| u64::from(p))
    }

    /// Records entry `index` (the next one) at byte `position`.
    pub(crate) fn push(&mut self, index: u64, term: u64, position: u64) -> Result<(), StoreError> {
        debug_assert_eq!(index, self.last_index() + 1);
        let offset = u32::try_from(position).map_err(|_| StoreError::TooLarge {
            what: "segment",
            size: position,
            limit: u64::from(u32::MAX),
        })?;
        self.offsets.push(offset);
        if self.terms.last().is_none_or(|&(_, t)| t != term) {
            self.terms.push((index, term));
        }
        Ok(())
    }

    /// Forgets entries from `index` on; returns where the first one started.
    /// The caller truncates the file there, then writes fresh hard-state and
    /// conf-state records: which records survive the cut is not tracked, so
    /// the latest ones are forgotten here (any that survive have lower
    /// sequence numbers than the fresh ones).
    pub(crate) fn truncate_from(&mut self, index: u64) -> u64 {
        let position = self.position(index);
        self.offsets.truncate((index - self.first_index) as usize);
        let runs = self.terms.partition_point(|&(start, _)| start < index);
        self.terms.truncate(runs);
        self.end = position;
        self.allocated = position;
        self.latest_hard_state = None;
        self.latest_conf_state = None;
        self.vouched = self.vouched.min(position);
        position
    }
}

/// The frame of a sync marker claiming `upto`, for a segment salted `salt`.
pub(crate) fn marker_frame(salt: u32, upto: u64) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::with_capacity(MARKER_FRAME_LEN as usize);
    put_frame(&mut buf, salt, |b| {
        put_synced(b, upto);
        Ok(())
    })?;
    Ok(buf)
}

/// Grows `file` to `len` bytes of allocated, zero-reading space
/// (`fallocate` mode 0; never glibc's `posix_fallocate`, which emulates it
/// by writing). Fails with `Unsupported` where the filesystem cannot do it
/// (e.g. FUSE without `fallocate`): the caller then just appends.
pub(crate) fn preallocate(file: &std::fs::File, from: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(length)) = (
        libc::off_t::try_from(from),
        libc::off_t::try_from(len.saturating_sub(from)),
    ) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    if length == 0 {
        return Ok(());
    }
    // SAFETY: `file` owns a valid descriptor for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, length) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => std::io::ErrorKind::Unsupported.into(),
        _ => err,
    })
}

/// A salt no producer can predict: `RandomState` keys come from the OS.
fn random_salt(first_index: u64) -> u32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(first_index);
    if let Ok(elapsed) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(elapsed.as_nanos());
    }
    hasher.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_bit_flips() {
        let header = SegmentHeader {
            salt: 0xdead_beef,
            generation: 3,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        for bit in 0..SEGMENT_HEADER_LEN * 8 {
            let mut bad = bytes;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentHeader::decode(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn file_names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.log");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.log"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_file_name("snapshot"), None);
    }
}
