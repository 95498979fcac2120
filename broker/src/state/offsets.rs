//! The offset index: where each accepted batch of a partition lives in the
//! partition's Raft log.
//!
//! One file per partition (`offsets` in the group's directory) holds a
//! fixed-size entry per accepted batch, in offset order: base offset, raft
//! index, record count, the partition's running max timestamp up to and
//! including the batch, and the batch's producer id, base sequence and
//! epoch. Offsets, raft indexes and running max timestamps all grow along
//! the file, so locating an offset, a raft index or a timestamp is a binary
//! search of `pread`s, and the index costs page cache, not heap: memory
//! does not grow with the data written. (It used to be one sled key per
//! batch, which sled kept in memory, and one sled write per round on the
//! produce path.)
//!
//! The index is derived state, like the rest of the applied state: the log
//! is the truth. Entries are appended once per driver round, without a
//! sync. A *checkpoint* of the partition's applied state
//! ([`crate::state::partition::PartitionState::checkpoint`]) first syncs
//! the index, then writes to sled the applied index together with the
//! number of index entries that cover it; on open the file is cut back to
//! that number and the entries after the checkpoint are replayed from the
//! log, appending them again. A file shorter than its checkpoint says (a
//! damaged disk) makes the partition rebuild its state from the log.
//!
//! Retention moves the *first live* entry forward and punches a hole over
//! the dead prefix where the filesystem supports it; entry positions never
//! change, so readers holding a position stay right.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use covet_raft_store::CachedFile;

use crate::error::{BrokerError, Result};

/// Bytes of one entry on disk.
pub const ENTRY_LEN: usize = 48;
/// Entries read per `pread` when scanning.
const SCAN_CHUNK: u64 = 4096;

/// One accepted batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub base_offset: u64,
    pub raft_index: u64,
    pub record_count: u32,
    /// The partition's max timestamp over every batch up to this one.
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub base_sequence: i32,
    pub producer_epoch: i16,
}

impl IndexEntry {
    /// Little-endian fields, then a CRC32C of them, so an entry that never
    /// fully reached the disk is told from a real one.
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.base_offset.to_le_bytes());
        out.extend_from_slice(&self.raft_index.to_le_bytes());
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&self.max_timestamp.to_le_bytes());
        out.extend_from_slice(&self.producer_id.to_le_bytes());
        out.extend_from_slice(&self.base_sequence.to_le_bytes());
        out.extend_from_slice(&self.producer_epoch.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<IndexEntry> {
        let b: &[u8; ENTRY_LEN] = b.try_into().ok()?;
        let crc = u32::from_le_bytes(b[44..48].try_into().ok()?);
        if crc32c::crc32c(&b[..44]) != crc {
            return None;
        }
        Some(IndexEntry {
            base_offset: u64::from_le_bytes(b[0..8].try_into().ok()?),
            raft_index: u64::from_le_bytes(b[8..16].try_into().ok()?),
            record_count: u32::from_le_bytes(b[16..20].try_into().ok()?),
            max_timestamp: i64::from_le_bytes(b[20..28].try_into().ok()?),
            producer_id: i64::from_le_bytes(b[28..36].try_into().ok()?),
            base_sequence: i32::from_le_bytes(b[36..40].try_into().ok()?),
            producer_epoch: i16::from_le_bytes(b[40..42].try_into().ok()?),
        })
    }

    /// The offset after this batch's last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    pub fn location(&self) -> BatchLocation {
        BatchLocation {
            base_offset: self.base_offset,
            raft_index: self.raft_index,
            record_count: self.record_count,
        }
    }
}

/// Where a batch lives, from the offset index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLocation {
    pub base_offset: u64,
    pub raft_index: u64,
    pub record_count: u32,
}

/// What readers see: the file and which of its entries are live.
#[derive(Default)]
struct View {
    /// Opened on demand through raft-store's bounded descriptor cache, so
    /// partitions × files do not run the process out of descriptors.
    file: Option<Arc<CachedFile>>,
    /// Position of the first entry retention kept.
    first_live: u64,
    /// Entries written (readable); later ones may be half written.
    len: u64,
}

/// A snapshot of [`View`] taken under the lock, read without it.
struct Span {
    file: Arc<File>,
    first: u64,
    len: u64,
}

impl Span {
    fn entry(&self, pos: u64) -> Result<IndexEntry> {
        let mut b = [0u8; ENTRY_LEN];
        self.file
            .read_exact_at(&mut b, pos * ENTRY_LEN as u64)
            .map_err(|e| BrokerError::Storage(format!("read offset index: {e}")))?;
        IndexEntry::decode(&b).ok_or_else(|| corrupt(pos))
    }

    /// Entries `[from, to)`.
    fn entries(&self, from: u64, to: u64) -> Result<Vec<IndexEntry>> {
        let n = to.saturating_sub(from) as usize;
        let mut buf = vec![0u8; n * ENTRY_LEN];
        self.file
            .read_exact_at(&mut buf, from * ENTRY_LEN as u64)
            .map_err(|e| BrokerError::Storage(format!("read offset index: {e}")))?;
        buf.chunks_exact(ENTRY_LEN)
            .enumerate()
            .map(|(i, b)| IndexEntry::decode(b).ok_or_else(|| corrupt(from + i as u64)))
            .collect()
    }

    /// The first live position whose entry satisfies `past` (which must be
    /// false for a prefix of the entries and true after), or `len`.
    fn partition_point(&self, past: impl Fn(&IndexEntry) -> bool) -> Result<u64> {
        let (mut lo, mut hi) = (self.first, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if past(&self.entry(mid)?) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }
}

fn corrupt(pos: u64) -> BrokerError {
    BrokerError::Storage(format!("offset index entry {pos} is corrupt"))
}

/// Read-only lookups, shared with readers (cheap to clone).
#[derive(Clone, Default)]
pub struct OffsetIndex {
    view: Arc<RwLock<View>>,
}

impl OffsetIndex {
    fn span(&self) -> Result<Option<Span>> {
        let (cached, first, len) = {
            let v = self.view.read().unwrap_or_else(|e| e.into_inner());
            match &v.file {
                Some(f) if v.len > v.first_live => (f.clone(), v.first_live, v.len),
                _ => return Ok(None),
            }
        };
        let file = cached
            .get()
            .map_err(|e| BrokerError::Storage(format!("open offset index: {e}")))?;
        Ok(Some(Span { file, first, len }))
    }

    /// The batch holding `offset`, if it is indexed.
    pub fn locate(&self, offset: u64) -> Result<Option<BatchLocation>> {
        let Some(s) = self.span()? else {
            return Ok(None);
        };
        let pos = s.partition_point(|e| e.base_offset > offset)?;
        if pos == s.first {
            return Ok(None);
        }
        let e = s.entry(pos - 1)?;
        Ok((offset < e.next_offset()).then(|| e.location()))
    }

    /// Up to `limit` batches starting with the one holding `offset` (or
    /// the first after it).
    pub fn batches_from(&self, offset: u64, limit: usize) -> Result<Vec<BatchLocation>> {
        let Some(s) = self.span()? else {
            return Ok(Vec::new());
        };
        let pos = s.partition_point(|e| e.next_offset() > offset)?;
        let to = s.len.min(pos.saturating_add(limit as u64));
        let mut out = Vec::new();
        let mut from = pos;
        while from < to {
            let end = to.min(from + SCAN_CHUNK);
            out.extend(s.entries(from, end)?.iter().map(IndexEntry::location));
            from = end;
        }
        Ok(out)
    }

    /// The base offset of the first batch whose running max timestamp is at
    /// or after `ts`.
    pub fn offset_for_time(&self, ts: i64) -> Result<Option<u64>> {
        let Some(s) = self.span()? else {
            return Ok(None);
        };
        let pos = s.partition_point(|e| e.max_timestamp >= ts)?;
        if pos == s.len {
            return Ok(None);
        }
        Ok(Some(s.entry(pos)?.base_offset))
    }
}

/// The writer's side of a partition's offset index.
pub struct OffsetLog {
    path: PathBuf,
    index: OffsetIndex,
    /// Encoded entries not written to the file yet.
    buf: Vec<u8>,
    /// Entries in `buf`.
    buffered: u64,
    /// Entries known to be on disk (synced).
    synced: u64,
    /// The file was created and its directory entry not synced yet.
    dir_unsynced: bool,
}

impl OffsetLog {
    /// Opens the index at `path` keeping its first `keep` entries (those a
    /// checkpoint vouches for; later ones are replayed from the log), the
    /// live ones from position `first_live` on. Returns `None` when the
    /// file holds fewer than `keep` entries: the applied state cannot be
    /// trusted and must be rebuilt.
    pub fn open(path: PathBuf, keep: u64, first_live: u64) -> Result<Option<OffsetLog>> {
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io("open", &path, e)),
        };
        // Checked on a descriptor of its own, then handed to the cache.
        let bytes = match &file {
            Some(f) => f.metadata().map_err(|e| io("stat", &path, e))?.len(),
            None => 0,
        };
        if bytes / (ENTRY_LEN as u64) < keep {
            return Ok(None);
        }
        // Entries past the checkpoint are replayed from the log.
        if let Some(f) = file.as_ref().filter(|_| bytes != keep * ENTRY_LEN as u64) {
            f.set_len(keep * ENTRY_LEN as u64)
                .map_err(|e| io("truncate", &path, e))?;
        }
        let view = View {
            file: file.map(|f| CachedFile::with_open(path.clone(), f)),
            first_live: first_live.min(keep),
            len: keep,
        };
        Ok(Some(OffsetLog {
            path,
            index: OffsetIndex {
                view: Arc::new(RwLock::new(view)),
            },
            buf: Vec::new(),
            buffered: 0,
            synced: keep,
            dir_unsynced: false,
        }))
    }

    pub fn index(&self) -> OffsetIndex {
        self.index.clone()
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.index.view.read().unwrap_or_else(|e| e.into_inner())
    }

    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.index.view.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Entries written to the file (what a checkpoint covers after
    /// [`OffsetLog::flush`]).
    pub fn written(&self) -> u64 {
        self.view().len
    }

    /// Buffers an entry; readers see it after [`OffsetLog::flush`].
    pub fn push(&mut self, e: &IndexEntry) {
        e.encode(&mut self.buf);
        self.buffered += 1;
    }

    /// The index file, created if it does not exist yet.
    fn file(&mut self) -> Result<Arc<File>> {
        let existing = self.view().file.clone();
        let cached = match existing {
            Some(f) => f,
            None => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&self.path)
                    .map_err(|e| io("create", &self.path, e))?;
                self.dir_unsynced = true;
                let f = CachedFile::with_open(self.path.clone(), f);
                self.view_mut().file = Some(f.clone());
                f
            }
        };
        cached.get().map_err(|e| io("open", &self.path, e))
    }

    /// Writes the buffered entries (one `pwrite`, no sync) and shows them
    /// to readers.
    pub fn flush(&mut self) -> Result<()> {
        if self.buffered == 0 {
            return Ok(());
        }
        let file = self.file()?;
        let len = self.written();
        file.write_all_at(&self.buf, len * ENTRY_LEN as u64)
            .map_err(|e| io("write", &self.path, e))?;
        self.view_mut().len = len + self.buffered;
        self.buf.clear();
        self.buffered = 0;
        Ok(())
    }

    /// Makes every written entry durable (before a checkpoint names them).
    pub fn sync(&mut self) -> Result<()> {
        let len = self.written();
        if len == self.synced && !self.dir_unsynced {
            return Ok(());
        }
        if self.view().file.is_some() {
            // Any descriptor of the inode syncs its dirty pages (see
            // raft-store's descriptor cache).
            self.file()?
                .sync_data()
                .map_err(|e| io("sync", &self.path, e))?;
        }
        if std::mem::take(&mut self.dir_unsynced) {
            if let Some(dir) = self.path.parent() {
                covet_raft_store::sync_dir(dir)?;
            }
        }
        self.synced = len;
        Ok(())
    }

    /// Whether entries were written since the last sync.
    pub fn unsynced(&self) -> bool {
        self.written() != self.synced || self.dir_unsynced
    }

    /// Position of the first live entry.
    pub fn first_live(&self) -> u64 {
        self.view().first_live
    }

    /// The live entries `[from, to)` by position.
    pub fn live_span(&self) -> (u64, u64) {
        let v = self.view();
        (v.first_live, v.len)
    }

    /// Reads the entries at positions `[from, to)`.
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<IndexEntry>> {
        match self.index.span()? {
            Some(s) => s.entries(from.max(s.first), to.min(s.len)),
            None => Ok(Vec::new()),
        }
    }

    /// The first live position whose entry satisfies `past`, or the end.
    pub fn find(&self, past: impl Fn(&IndexEntry) -> bool) -> Result<u64> {
        match self.index.span()? {
            Some(s) => s.partition_point(past),
            None => Ok(self.written()),
        }
    }

    /// Drops the entries of batches below `start_offset`. Returns the last
    /// dropped entry, if any was live.
    pub fn trim(&mut self, start_offset: u64) -> Result<Option<IndexEntry>> {
        self.flush()?;
        let pos = self.find(|e| e.base_offset >= start_offset)?;
        let first = self.view().first_live;
        if pos <= first {
            return Ok(None);
        }
        let last = self.read(pos - 1, pos)?.pop();
        self.view_mut().first_live = pos;
        let file = self.file()?;
        punch_hole(&file, pos * ENTRY_LEN as u64);
        Ok(last)
    }

    /// Forgets every entry.
    pub fn clear(&mut self) -> Result<()> {
        self.buf.clear();
        self.buffered = 0;
        if self.view().file.is_some() {
            self.file()?
                .set_len(0)
                .map_err(|e| io("truncate", &self.path, e))?;
        }
        let mut v = self.view_mut();
        v.first_live = 0;
        v.len = 0;
        drop(v);
        self.synced = 0;
        Ok(())
    }
}

/// Frees the disk blocks of the first `bytes` of `file` (whole pages),
/// keeping its size. Best effort: a filesystem that cannot punch holes
/// keeps the blocks, which only costs disk space. Only dead entries are
/// ever in the hole: nothing reads them again (the first live position is
/// kept in the partition's state, not searched for).
fn punch_hole(file: &File, bytes: u64) {
    use std::os::fd::AsRawFd;
    let len = bytes & !4095;
    if len == 0 {
        return;
    }
    // SAFETY: fallocate on a file descriptor we own; no memory is shared.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "offset index: hole punching unsupported; dead entries keep their blocks"
        );
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::Storage(format!("{what} offset index {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(base: u64, raft: u64, n: u32, ts: i64) -> IndexEntry {
        IndexEntry {
            base_offset: base,
            raft_index: raft,
            record_count: n,
            max_timestamp: ts,
            producer_id: -1,
            base_sequence: -1,
            producer_epoch: 0,
        }
    }

    fn filled(dir: &Path) -> OffsetLog {
        let mut log = OffsetLog::open(dir.join("offsets"), 0, 0).unwrap().unwrap();
        for i in 0..100u64 {
            log.push(&entry(i * 10, 6 + i * 2, 10, 1000 + i as i64 * 5));
        }
        log.flush().unwrap();
        log
    }

    #[test]
    fn locates_offsets_times_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let log = filled(dir.path());
        let idx = log.index();
        assert_eq!(idx.locate(0).unwrap().unwrap().raft_index, 6);
        assert_eq!(idx.locate(15).unwrap().unwrap().base_offset, 10);
        assert_eq!(idx.locate(999).unwrap().unwrap().base_offset, 990);
        assert_eq!(idx.locate(1000).unwrap(), None);
        let from = idx.batches_from(25, 3).unwrap();
        assert_eq!(
            from.iter().map(|l| l.base_offset).collect::<Vec<_>>(),
            [20, 30, 40]
        );
        assert_eq!(idx.offset_for_time(0).unwrap(), Some(0));
        assert_eq!(idx.offset_for_time(1012).unwrap(), Some(30));
        assert_eq!(idx.offset_for_time(5000).unwrap(), None);
    }

    #[test]
    fn reopening_keeps_what_a_checkpoint_named_and_reports_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = filled(dir.path());
        log.sync().unwrap();
        drop(log);
        let log = OffsetLog::open(dir.path().join("offsets"), 40, 0)
            .unwrap()
            .unwrap();
        assert_eq!(log.written(), 40);
        assert_eq!(log.index().locate(400).unwrap(), None);
        drop(log);
        assert!(OffsetLog::open(dir.path().join("offsets"), 41, 0)
            .unwrap()
            .is_none());
    }

    #[test]
    fn trimming_hides_dead_entries_and_a_torn_entry_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = filled(dir.path());
        let last = log.trim(500).unwrap().unwrap();
        assert_eq!(last.base_offset, 490);
        let idx = log.index();
        assert_eq!(idx.locate(499).unwrap(), None);
        assert_eq!(idx.locate(500).unwrap().unwrap().base_offset, 500);
        assert_eq!(idx.offset_for_time(0).unwrap(), Some(500));
        // Damage an entry on disk: reads fail instead of serving garbage.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("offsets"))
            .unwrap();
        f.write_all_at(&[0xff; 4], 60 * ENTRY_LEN as u64 + 3)
            .unwrap();
        assert!(idx.locate(605).is_err());
    }
}
