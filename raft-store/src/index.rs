//! Index files: what open needs to know about a sealed segment, so that it
//! never has to read the segment itself.
//!
//! When the writer rolls to a new segment it first `fdatasync`s the old one;
//! the old one is then *sealed*: nothing writes to it again unless a
//! conflicting-suffix truncation cuts back into it. Its in-memory index is
//! then written next to it as `{first_index:020}.idx`: to
//! `{first_index:020}.idx.tmp`, fsynced, renamed (the directory fsync rides
//! on the one the roll needs anyway for the new segment).
//!
//! Wire format (integers little-endian):
//!
//! ```text
//! magic "COVETIDX" | version u32 = 1
//! | first_index u64 | salt u32 | generation u64 | segment_len u64 | entry_count u64
//! | has_hard_state u8 [ seq u64 | term u64 | vote u64 | commit u64 ]
//! | has_conf_state u8 [ seq u64 | conf state fields, as in records ]
//! | run_count u32 | run_count × (first index u64 | term u64)
//! | entry_count × frame offset u32
//! | crc u32 = CRC32C of every byte before it
//! ```
//!
//! An index is trusted only if it decodes, its checksum matches, and it
//! names the segment file as it is now: same first index, same salt and
//! generation as the segment's header (so an index can never be matched to
//! a different file of the same name: salts are random per file), and the
//! same length as the file. Anything else just means "scan this segment".
//!
//! What keeps an index from going stale: an index is only ever written for
//! a segment that was synced and will not change, and every operation that
//! changes or removes a segment removes its index first. Suffix truncation
//! removes the index of the segment it cuts into *durably* (unlink, fsync
//! the directory) before it cuts, so an older index can never reappear for
//! a segment whose contents changed; open does the same for the last
//! segment (the active one), which it may cut and will append to.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, HardState};

use crate::error::StoreError;
use crate::record::{
    put_conf_state_fields, put_hard_state_fields, read_conf_state_fields, read_hard_state_fields,
    ByteReader,
};
use crate::segment::{parse_numbered_name, Segment, SegmentHeader, SEGMENT_HEADER_LEN};

const MAGIC: &[u8; 8] = b"COVETIDX";
const VERSION: u32 = 1;
const INDEX_SUFFIX: &str = ".idx";
const TEMP_SUFFIX: &str = ".idx.tmp";
const CRC_LEN: usize = 4;

/// A sealed segment as its index file describes it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SegmentIndex {
    pub first_index: u64,
    pub salt: u32,
    pub generation: u64,
    /// The segment file's length when it was sealed.
    pub segment_len: u64,
    /// Frame offset of each entry.
    pub offsets: Vec<u32>,
    /// Term runs: `(first index, term)`.
    pub terms: Vec<(u64, u64)>,
    /// The hard-state record with the highest sequence number in the segment.
    pub hard_state: Option<(u64, HardState)>,
    /// The conf-state record with the highest sequence number in the segment.
    pub conf_state: Option<(u64, ConfState)>,
}

/// A file name in a group directory that belongs to an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexName {
    /// `{first_index:020}.idx`
    Index(u64),
    /// `{first_index:020}.idx.tmp`: an index write that did not finish.
    Temp(u64),
}

pub(crate) fn parse_index_file_name(name: &str) -> Option<IndexName> {
    // Check the longer suffix first: "x.idx.tmp" does not end in ".idx".
    parse_numbered_name(name, TEMP_SUFFIX)
        .map(IndexName::Temp)
        .or_else(|| parse_numbered_name(name, INDEX_SUFFIX).map(IndexName::Index))
}

pub(crate) fn index_file_name(first_index: u64) -> String {
    format!("{first_index:020}{INDEX_SUFFIX}")
}

fn temp_file_name(first_index: u64) -> String {
    format!("{first_index:020}{TEMP_SUFFIX}")
}

/// Encodes the index of `segment`, a segment of log generation `generation`.
pub(crate) fn encode(segment: &Segment, generation: u64) -> Vec<u8> {
    let offsets = segment.offsets();
    let runs = segment.term_runs();
    let mut out = Vec::with_capacity(128 + 4 * offsets.len() + 16 * runs.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&segment.first_index.to_le_bytes());
    out.extend_from_slice(&segment.salt.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&segment.end.to_le_bytes());
    out.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    match segment.latest_hard_state() {
        Some((seq, hs)) => {
            out.push(1);
            out.extend_from_slice(&seq.to_le_bytes());
            put_hard_state_fields(&mut out, hs);
        }
        None => out.push(0),
    }
    match segment.latest_conf_state() {
        Some((seq, cs)) => {
            out.push(1);
            out.extend_from_slice(&seq.to_le_bytes());
            put_conf_state_fields(&mut out, cs);
        }
        None => out.push(0),
    }
    // Runs change with the term only: far fewer than u32::MAX per segment.
    out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for &(start, term) in runs {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&term.to_le_bytes());
    }
    for &offset in offsets {
        out.extend_from_slice(&offset.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes and checks an index file: checksum, and that it describes a
/// well-formed segment (offsets increasing and inside the file, term runs
/// covering the entries). Never panics and never allocates more than the
/// input's size on arbitrary input.
pub(crate) fn decode(file: &[u8]) -> Result<SegmentIndex, String> {
    let Some(body_len) = file.len().checked_sub(CRC_LEN) else {
        return Err("index file too short".into());
    };
    let (body, crc) = file.split_at(body_len);
    let mut r = ByteReader::new(body);
    if r.take(8)? != MAGIC {
        return Err("not an index file (bad magic)".into());
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!("unsupported index version {version}"));
    }
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != crc {
        return Err("index checksum mismatch".into());
    }
    let first_index = r.u64()?;
    let salt = r.u32()?;
    let generation = r.u64()?;
    let segment_len = r.u64()?;
    let entry_count = r.u64()?;
    let hard_state = match r.u8()? {
        0 => None,
        1 => Some((r.u64()?, read_hard_state_fields(&mut r)?)),
        other => return Err(format!("bad hard-state flag {other}")),
    };
    let conf_state = match r.u8()? {
        0 => None,
        1 => Some((r.u64()?, read_conf_state_fields(&mut r)?)),
        other => return Err(format!("bad conf-state flag {other}")),
    };
    let run_count = r.u32()? as usize;
    if run_count > r.remaining() / 16 {
        return Err(format!("{run_count} term runs overrun the file"));
    }
    let mut terms = Vec::with_capacity(run_count);
    for _ in 0..run_count {
        terms.push((r.u64()?, r.u64()?));
    }
    if entry_count != (r.remaining() / 4) as u64 || r.remaining() % 4 != 0 {
        return Err(format!(
            "{entry_count} entries but {} bytes of offsets",
            r.remaining()
        ));
    }
    let mut offsets = Vec::with_capacity(entry_count as usize);
    for _ in 0..entry_count {
        offsets.push(r.u32()?);
    }
    let index = SegmentIndex {
        first_index,
        salt,
        generation,
        segment_len,
        offsets,
        terms,
        hard_state,
        conf_state,
    };
    index.check_shape()?;
    Ok(index)
}

impl SegmentIndex {
    /// The invariants `Segment` relies on.
    fn check_shape(&self) -> Result<(), String> {
        let count = self.offsets.len() as u64;
        if self.first_index == 0 || self.first_index.checked_add(count).is_none() {
            return Err(format!("bad first index {}", self.first_index));
        }
        if self.segment_len < SEGMENT_HEADER_LEN as u64 {
            return Err(format!("segment length {} too short", self.segment_len));
        }
        let mut previous = None;
        for &offset in &self.offsets {
            let offset = u64::from(offset);
            if offset < SEGMENT_HEADER_LEN as u64
                || offset >= self.segment_len
                || previous.is_some_and(|p| offset <= p)
            {
                return Err(format!("bad entry offset {offset}"));
            }
            previous = Some(offset);
        }
        let last_index = self.first_index + count - 1;
        match self.terms.first() {
            None if count == 0 => {}
            Some(&(start, _)) if count > 0 && start == self.first_index => {}
            _ => return Err("term runs do not start at the first entry".into()),
        }
        for pair in self.terms.windows(2) {
            if pair[1].0 <= pair[0].0 {
                return Err("term runs out of order".into());
            }
        }
        if self
            .terms
            .last()
            .is_some_and(|&(start, _)| start > last_index)
        {
            return Err("term run beyond the last entry".into());
        }
        Ok(())
    }

    /// Why this index does not describe the segment file named after
    /// `first_index`, with header `header` and length `len`; `None` if it does.
    pub(crate) fn mismatch(
        &self,
        first_index: u64,
        header: &SegmentHeader,
        len: u64,
    ) -> Option<String> {
        if self.first_index != first_index {
            Some(format!("index is for first index {}", self.first_index))
        } else if self.salt != header.salt || self.generation != header.generation {
            Some("index is for another segment file (salt or generation differ)".into())
        } else if self.segment_len != len {
            Some(format!(
                "index describes {} bytes, the segment has {len}",
                self.segment_len
            ))
        } else {
            None
        }
    }
}

/// Where the index of the segment at `segment_path` lives.
pub(crate) fn index_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension(&INDEX_SUFFIX[1..])
}

/// Writes `dir/{first_index:020}.idx` atomically: temp file, fsync, rename.
/// The rename is durable with the directory's next fsync; until then a
/// crash leaves either no index or this one. Removes the temp file on
/// failure.
pub(crate) fn store(dir: &Path, first_index: u64, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(temp_file_name(first_index));
    let result = (|| {
        let mut out = File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
        out.write_all(bytes)
            .map_err(|e| StoreError::io("write", &tmp, e))?;
        out.sync_all()
            .map_err(|e| StoreError::io("fsync", &tmp, e))?;
        let path = dir.join(index_file_name(first_index));
        fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes the index of the segment at `segment_path`; returns whether
/// there was one. Not durable until the directory is fsynced.
pub(crate) fn remove(segment_path: &Path) -> Result<bool, StoreError> {
    remove_file(&index_path(segment_path))
}

/// Removes a file; returns whether it existed.
pub(crate) fn remove_file(path: &Path) -> Result<bool, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io("remove index", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fdcache::SegmentFile;

    fn sample(dir: &Path) -> Segment {
        let path = dir.join("00000000000000000007.log");
        File::create(&path).expect("create");
        let file = SegmentFile::new(path.clone());
        let mut segment = Segment::new(7, path, file, 0xfeed, 32);
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 8,
            ..Default::default()
        };
        let cs = ConfState {
            voters: vec![1, 2, 3],
            auto_leave: true,
            ..Default::default()
        };
        segment.note_hard_state(5, &hs);
        segment.note_conf_state(6, &cs);
        for (i, term) in [(7, 2), (8, 2), (9, 3)] {
            segment.push(i, term, 32 + (i - 7) * 40).expect("push");
        }
        segment.end = 200;
        segment
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let segment = sample(dir.path());
        let index = decode(&encode(&segment, 4)).expect("decodes");
        assert_eq!(index.first_index, 7);
        assert_eq!(index.salt, 0xfeed);
        assert_eq!(index.generation, 4);
        assert_eq!(index.segment_len, 200);
        assert_eq!(index.offsets, segment.offsets());
        assert_eq!(index.terms, segment.term_runs());
        assert_eq!(index.hard_state.as_ref(), segment.latest_hard_state());
        assert_eq!(index.conf_state.as_ref(), segment.latest_conf_state());
        let header = SegmentHeader {
            salt: 0xfeed,
            generation: 4,
        };
        assert_eq!(index.mismatch(7, &header, 200), None);
        assert!(index.mismatch(8, &header, 200).is_some());
        assert!(index.mismatch(7, &header, 201).is_some());
        let other_salt = SegmentHeader { salt: 1, ..header };
        assert!(index.mismatch(7, &other_salt, 200).is_some());
        let other_generation = SegmentHeader {
            generation: 5,
            ..header
        };
        assert!(index.mismatch(7, &other_generation, 200).is_some());
    }

    #[test]
    fn empty_segment_round_trips() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let path = dir.path().join("00000000000000000001.log");
        File::create(&path).expect("create");
        let file = SegmentFile::new(path.clone());
        let segment = Segment::new(1, path, file, 9, 32);
        let index = decode(&encode(&segment, 0)).expect("decodes");
        assert!(index.offsets.is_empty() && index.terms.is_empty());
        assert_eq!(index.hard_state, None);
    }

    #[test]
    fn every_truncation_and_bit_flip_fails() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let bytes = encode(&sample(dir.path()), 4);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "prefix {cut}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad).is_err(), "bit {bit}");
        }
    }

    /// Re-checksums `bytes` after an edit, as a buggy writer would.
    fn reseal(bytes: &mut [u8]) {
        let body = bytes.len() - CRC_LEN;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn badly_shaped_indexes_are_refused_even_with_a_valid_checksum() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let bytes = encode(&sample(dir.path()), 4);
        let offsets_at = bytes.len() - CRC_LEN - 12;
        // Second offset not after the first.
        let mut bad = bytes.clone();
        bad[offsets_at + 4..offsets_at + 8].copy_from_slice(&32u32.to_le_bytes());
        reseal(&mut bad);
        assert!(decode(&bad).unwrap_err().contains("offset"));
        // Last offset past the end of the segment.
        let mut bad = bytes.clone();
        bad[offsets_at + 8..offsets_at + 12].copy_from_slice(&500u32.to_le_bytes());
        reseal(&mut bad);
        assert!(decode(&bad).unwrap_err().contains("offset"));
        // First term run not at the first entry.
        let runs_at = offsets_at - 2 * 16;
        let mut bad = bytes.clone();
        bad[runs_at..runs_at + 8].copy_from_slice(&8u64.to_le_bytes());
        reseal(&mut bad);
        assert!(decode(&bad).unwrap_err().contains("term runs"));
        // An entry count that disagrees with the offsets.
        let count_at = 12 + 8 + 4 + 8 + 8;
        let mut bad = bytes;
        bad[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        reseal(&mut bad);
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn file_names() {
        assert_eq!(index_file_name(42), "00000000000000000042.idx");
        assert_eq!(
            parse_index_file_name("00000000000000000042.idx"),
            Some(IndexName::Index(42))
        );
        assert_eq!(
            parse_index_file_name("00000000000000000042.idx.tmp"),
            Some(IndexName::Temp(42))
        );
        assert_eq!(parse_index_file_name("00000000000000000042.log"), None);
        assert_eq!(parse_index_file_name("42.idx"), None);
        assert_eq!(
            index_path(Path::new("/a.b/00000000000000000042.log")),
            Path::new("/a.b/00000000000000000042.idx")
        );
    }
}
