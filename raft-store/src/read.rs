//! The read path, shared by `GroupStorage::read` and `Storage::entries`.
//!
//! A read holds the state's read lock only to plan: which segment files
//! (`Arc<SegmentFile>`) and byte ranges hold the wanted entries. It then
//! gets each file from the descriptor cache (opening it if it was evicted;
//! see [`crate::fdcache`]) and reads each
//! range with one `pread` into one buffer, verifies every frame's checksum,
//! and slices entries' data and context out of that buffer as `Bytes`
//! without copying. If a truncation rewrote bytes while it read (the
//! state's `rewrites` counter moved), or a segment it planned was removed
//! (compacted, or discarded by a snapshot) before it could open it, it
//! retries; after a few such races it holds the read lock for the whole
//! read.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::Entry;

use crate::error::StoreError;
use crate::fdcache::{self, SegmentFile};
use crate::frame::parse_frame;
use crate::record::{self, Record};
use crate::state::LogState;
use crate::storage::{GroupStorage, Inner};

/// Optimistic attempts before a read holds the lock throughout.
const OPTIMISTIC_ATTEMPTS: usize = 4;

/// Attempts with the lock held, each a millisecond apart. Only
/// `apply_snapshot` can make one fail: it removes the old segments (after
/// retiring them) before it publishes the new log, a few fsyncs later. If
/// it never does (an I/O error poisoned the group), the read fails.
const HELD_ATTEMPTS: usize = 2_000;

/// What a size limit counts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Measure {
    /// Bytes of entry data (`GroupStorage::read`).
    Data,
    /// Protobuf-encoded size, as `raft::util::limit_size` counts.
    Encoded,
}

impl Measure {
    fn of(self, entry: &Entry) -> u64 {
        match self {
            Measure::Data => entry.data.len() as u64,
            Measure::Encoded => u64::from(entry.compute_size()),
        }
    }
}

/// A contiguous byte range of one segment holding `count` entries from `first`.
struct Chunk {
    path: PathBuf,
    file: Arc<SegmentFile>,
    salt: u32,
    start: u64,
    end: u64,
    first: u64,
    count: u64,
}

/// The entries gathered so far, and the size limit.
struct Gathered {
    entries: Vec<Entry>,
    used: u64,
    limit: Option<u64>,
    measure: Measure,
    full: bool,
}

impl Gathered {
    /// Takes `entry` unless the limit is reached; the first entry always fits.
    fn offer(&mut self, entry: Entry) -> bool {
        let size = self.measure.of(&entry);
        let fits = self
            .limit
            .is_none_or(|limit| self.used.saturating_add(size) <= limit);
        if !self.entries.is_empty() && !fits {
            self.full = true;
            return false;
        }
        self.used = self.used.saturating_add(size);
        self.entries.push(entry);
        true
    }

    /// The budget left for planning: at least one more entry is planned.
    fn remaining(&self) -> Option<u64> {
        self.limit.map(|limit| limit.saturating_sub(self.used))
    }
}

enum Failure {
    Raced,
    Failed(StoreError),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Self {
        Failure::Failed(err)
    }
}

impl GroupStorage {
    /// Entries `[low, high)`, at most `max_bytes` of entry data but always
    /// at least one entry if the range is not empty. Errors with
    /// `Compacted` if `low < first_index`, `Unavailable` if
    /// `high > last_index + 1`, `Corrupt` if a frame read fails its checksum.
    /// Safe to call from any thread while another appends: everything
    /// `append` has returned from is readable, synced or not (the broker
    /// reads only committed, hence synced, entries).
    pub fn read(&self, low: u64, high: u64, max_bytes: u64) -> Result<Vec<Entry>, StoreError> {
        self.inner
            .read_entries(low, high, Some(max_bytes), Measure::Data)
    }
}

impl Inner {
    /// Reads entries; a read that meets corruption (or cannot read a
    /// segment) marks the group faulted before returning the error.
    pub(crate) fn read_entries(
        &self,
        low: u64,
        high: u64,
        limit: Option<u64>,
        measure: Measure,
    ) -> Result<Vec<Entry>, StoreError> {
        let result = self.read_entries_once(low, high, limit, measure);
        if let Err(err @ (StoreError::Corrupt { .. } | StoreError::Io { .. })) = &result {
            self.note_fault(err);
        }
        result
    }

    fn read_entries_once(
        &self,
        low: u64,
        high: u64,
        limit: Option<u64>,
        measure: Measure,
    ) -> Result<Vec<Entry>, StoreError> {
        for _ in 0..OPTIMISTIC_ATTEMPTS {
            match self.try_read(low, high, limit, measure, None) {
                Ok(entries) => return Ok(entries),
                Err(Failure::Raced) => continue,
                Err(Failure::Failed(err)) => return Err(err),
            }
        }
        for _ in 0..HELD_ATTEMPTS {
            let st = self.read_state();
            match self.try_read(low, high, limit, measure, Some(&st)) {
                Ok(entries) => return Ok(entries),
                Err(Failure::Failed(err)) => return Err(err),
                // No rewrite can happen while the read lock is held, but
                // `apply_snapshot` retires the old segments before it
                // replaces them: wait for it, without the lock.
                Err(Failure::Raced) => {
                    drop(st);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        Err(StoreError::io(
            "read segment",
            &self.dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the segments being read were removed and never replaced",
            ),
        ))
    }

    /// One read attempt. With `held`, the caller holds the read lock
    /// throughout and no race is possible.
    fn try_read(
        &self,
        low: u64,
        high: u64,
        limit: Option<u64>,
        measure: Measure,
        held: Option<&LogState>,
    ) -> Result<Vec<Entry>, Failure> {
        let mut gathered = Gathered {
            entries: Vec::new(),
            used: 0,
            limit,
            measure,
            full: false,
        };
        let mut rewrites = None;
        loop {
            let next = low + gathered.entries.len() as u64;
            let chunks = self.with_state(held, |st| {
                match rewrites {
                    None => st.check_range(low, high)?,
                    // Entries already gathered may have been rewritten, or
                    // the rest compacted: start over.
                    Some(seen) if seen != st.rewrites || next < st.first_index() => {
                        return Err(Failure::Raced)
                    }
                    Some(_) => {}
                }
                rewrites = Some(st.rewrites);
                Ok(plan(st, next, high, gathered.remaining()))
            })?;
            // Chunks after the limit was reached are not read.
            let result = chunks.iter().try_for_each(|chunk| {
                if gathered.full {
                    return Ok(());
                }
                read_chunk(chunk, &mut gathered)
            });
            let raced = || held.is_none() && rewrites != Some(self.read_state().rewrites);
            match result {
                Err(Failure::Failed(err)) if !raced() => return Err(Failure::Failed(err)),
                Err(_) => return Err(Failure::Raced),
                Ok(()) => {}
            }
            let next = low + gathered.entries.len() as u64;
            if chunks.is_empty() || gathered.full || next >= high {
                return if raced() {
                    Err(Failure::Raced)
                } else {
                    Ok(gathered.entries)
                };
            }
        }
    }

    fn with_state<T>(&self, held: Option<&LogState>, f: impl FnOnce(&LogState) -> T) -> T {
        match held {
            Some(st) => f(st),
            None => f(&self.read_state()),
        }
    }
}

/// Plans chunks for `[next, high)`: entries while their frames' bytes stay
/// within `budget` (an estimate; the exact limit applies after decoding),
/// and at least one.
fn plan(st: &LogState, next: u64, high: u64, budget: Option<u64>) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    let mut index = next;
    let mut planned = 0u64;
    while index < high {
        let Some(slot) = st.segment_for(index) else {
            break;
        };
        let segment = &st.segments[slot];
        let segment_high = high.min(segment.last_index() + 1);
        let first = index;
        let mut over_budget = false;
        while index < segment_high {
            let span = segment.position(index + 1) - segment.position(index);
            if planned > 0 && budget.is_some_and(|b| planned + span > b) {
                over_budget = true;
                break;
            }
            planned += span;
            index += 1;
        }
        if index > first {
            chunks.push(Chunk {
                path: segment.path.clone(),
                file: Arc::clone(&segment.file),
                salt: segment.salt,
                start: segment.position(first),
                end: segment.position(index),
                first,
                count: index - first,
            });
        }
        if over_budget {
            break;
        }
    }
    chunks
}

/// Reads one chunk with one `pread` and offers its entries to `gathered`.
/// A segment removed since the read planned it is a race.
fn read_chunk(chunk: &Chunk, gathered: &mut Gathered) -> Result<(), Failure> {
    let mut buf = vec![0; (chunk.end - chunk.start) as usize];
    let file = match chunk.file.get() {
        Ok(file) => file,
        Err(e) if fdcache::is_retired(&e) => return Err(Failure::Raced),
        Err(e) => return Err(StoreError::io("open segment", &chunk.path, e).into()),
    };
    file.read_exact_at(&mut buf, chunk.start)
        .map_err(|e| StoreError::io("read segment", &chunk.path, e))?;
    drop(file);
    let buf = Bytes::from(buf);
    let mut offset = 0;
    let mut index = chunk.first;
    while index < chunk.first + chunk.count {
        let corrupt =
            |reason: String| StoreError::corrupt(&chunk.path, chunk.start + offset as u64, reason);
        let payload =
            parse_frame(&buf[offset..], chunk.salt).map_err(|e| corrupt(e.to_string()))?;
        let payload = buf.slice(offset + payload.start..offset + payload.end);
        match record::decode(&payload).map_err(corrupt)? {
            Record::Entry(meta) if meta.index == index => {
                if !gathered.offer(meta.to_entry(&payload)) {
                    return Ok(());
                }
                index += 1;
            }
            Record::Entry(meta) => {
                return Err(corrupt(format!(
                    "entry index {} where {index} was expected",
                    meta.index
                ))
                .into());
            }
            Record::HardState(..) | Record::ConfState(..) | Record::Synced { .. } => {}
        }
        offset += crate::frame::FRAME_HEADER_LEN + payload.len();
    }
    Ok(())
}
