//! A process-wide, bounded cache of open segment files.
//!
//! A broker runs thousands of groups, each with one or more segments; an
//! open descriptor per segment would make the number of descriptors grow
//! with partitions × segments and run the process out of them (then every
//! write, and the next start, fails). Instead each [`Segment`] holds a
//! [`SegmentFile`]: its path and an id. Reads and writes ask it for an
//! `Arc<File>`; the cache opens the file on demand, keeps at most
//! [`max_open_files`] of them open, and closes the least recently used
//! when it goes over. An operation that got an `Arc<File>` keeps it open
//! until it finishes, even if the cache evicts it meanwhile, so the bound
//! is the cache's plus the operations in flight.
//!
//! # Writes, eviction and `fdatasync`
//!
//! The active segment goes through the cache too. A write may go through
//! one descriptor, which is then evicted and closed, and the `sync` that
//! makes it durable `fdatasync`s a descriptor opened later on the same
//! file. That is sound on Linux: dirty pages belong to the inode (its page
//! cache), not to the descriptor, `close` discards nothing, and
//! `fsync`/`fdatasync` on any descriptor of the inode writes back all of
//! them. A writeback error that happened while no descriptor was open is
//! not lost either: since Linux 4.16 the kernel keeps an error no one has
//! seen yet (`errseq_t`) and reports it to the next `fsync`, on a
//! descriptor opened after it too. (Nothing else in the process `fsync`s
//! segment files, so no one else sees it first.) A descriptor is opened by
//! path; a segment's path is never renamed.
//!
//! # Removed segments
//!
//! A segment's name can be reused (a suffix truncation removes segment
//! `N`, and a later roll may create a new segment `N`), and a reader may
//! still hold the [`SegmentFile`] of a removed one. So a segment is
//! [retired](SegmentFile::retire) before its file is unlinked: its cached
//! descriptor is dropped and it never opens its path again
//! ([`SegmentFile::get`] then fails with [`Retired`], which readers treat
//! as a race and retry, and `sync` skips). The check is repeated after an
//! open, under the cache's lock, so an open that raced with a removal and
//! a re-creation never hands out the new file.
//!
//! # Running out of descriptors
//!
//! If an open fails with `EMFILE` or `ENFILE` (the process or the system is
//! out of descriptors, e.g. connections took them), the cache closes every
//! descriptor it holds that no operation is using and tries once more, so
//! storage gives back what it can before failing a write.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Default [`max_open_files`]: 512 segment files open at once.
pub const DEFAULT_MAX_OPEN_FILES: usize = 512;

/// Lower bound of [`set_max_open_files`]: a read may hold a few segments.
const MIN_OPEN_FILES: usize = 4;

static MAX_OPEN_FILES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_OPEN_FILES);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Sets how many segment files the process keeps open at once, across
/// every group (at least 4; default [`DEFAULT_MAX_OPEN_FILES`]). Call it
/// once at start, before opening groups; a lower value takes effect as
/// files are next opened. Leave room under the descriptor limit for the
/// operations in flight (each holds its file open until it finishes),
/// sockets and other files.
pub fn set_max_open_files(max: usize) {
    MAX_OPEN_FILES.store(max.max(MIN_OPEN_FILES), Ordering::Relaxed);
}

/// How many segment files the process keeps open at most (see
/// [`set_max_open_files`]).
pub fn max_open_files() -> usize {
    MAX_OPEN_FILES.load(Ordering::Relaxed)
}

/// How many segment files the cache holds open right now (not counting
/// files evicted but still in use by an operation).
pub fn open_files() -> usize {
    lock().files.len()
}

/// `SegmentFile::get` on a segment whose file was removed.
#[derive(Debug)]
pub(crate) struct Retired;

impl fmt::Display for Retired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("segment was removed")
    }
}

impl std::error::Error for Retired {}

/// The error of [`SegmentFile::get`] when the segment was retired.
pub(crate) fn is_retired(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<Retired>())
}

/// One segment file (or another file a group keeps, such as the broker's
/// offset index), opened on demand through the cache.
pub struct SegmentFile {
    id: u64,
    path: PathBuf,
    retired: AtomicBool,
}

impl SegmentFile {
    /// A handle on the file at `path`, not opened until used.
    pub fn new(path: PathBuf) -> Arc<SegmentFile> {
        Arc::new(SegmentFile {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            path,
            retired: AtomicBool::new(false),
        })
    }

    /// A handle on `file`, just opened or created at `path`: it goes into
    /// the cache, so the first use needs no open.
    pub fn with_open(path: PathBuf, file: File) -> Arc<SegmentFile> {
        let handle = SegmentFile::new(path);
        let evicted = lock().insert(handle.id, Arc::new(file), max_open_files());
        drop(evicted);
        handle
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, from the cache or opened now (read-write). Fails
    /// with a `Retired` error (see `is_retired`) once the segment was
    /// retired.
    pub fn get(&self) -> io::Result<Arc<File>> {
        {
            let mut cache = lock();
            self.check_live()?;
            if let Some(file) = cache.touch(self.id) {
                return Ok(file);
            }
        }
        // Opened outside the lock: opens of different files run in
        // parallel; two of the same file race harmlessly (one is kept).
        let opened = match self.open() {
            Err(e) if is_out_of_descriptors(&e) => {
                drop(lock().release_idle());
                self.open()
            }
            other => other,
        };
        let file = match opened {
            Ok(file) => file,
            Err(e) => {
                // A removal may have unlinked the file since the check
                // above: that is a `Retired`, not an I/O failure.
                self.check_live()?;
                return Err(e);
            }
        };
        let mut cache = lock();
        // A removal (and maybe a new file of the same name) may have come
        // between the check above and the open.
        self.check_live()?;
        if let Some(cached) = cache.touch(self.id) {
            return Ok(cached);
        }
        let file = Arc::new(file);
        let evicted = cache.insert(self.id, Arc::clone(&file), max_open_files());
        drop(cache);
        // Closed outside the lock.
        drop(evicted);
        Ok(file)
    }

    /// Marks the segment removed, before its file is unlinked: its cached
    /// descriptor is dropped, and it is never opened again.
    pub(crate) fn retire(&self) {
        let closed = {
            let mut cache = lock();
            self.retired.store(true, Ordering::Release);
            cache.remove(self.id)
        };
        drop(closed);
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn check_live(&self) -> io::Result<()> {
        if self.is_retired() {
            return Err(io::Error::new(io::ErrorKind::NotFound, Retired));
        }
        Ok(())
    }

    fn open(&self) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(&self.path)
    }
}

impl Drop for SegmentFile {
    fn drop(&mut self) {
        let closed = lock().remove(self.id);
        drop(closed);
    }
}

impl fmt::Debug for SegmentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentFile")
            .field("path", &self.path)
            .field("retired", &self.is_retired())
            .finish_non_exhaustive()
    }
}

fn is_out_of_descriptors(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(EMFILE | ENFILE))
}

/// `EMFILE` and `ENFILE` on Linux (and every other Unix Covet runs on).
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// The least-recently-used cache: open files by id, and ids by last use.
#[derive(Default)]
struct Cache {
    files: HashMap<u64, (Arc<File>, u64)>,
    by_use: BTreeMap<u64, u64>,
    clock: u64,
}

impl Cache {
    /// The file of `id`, if cached, now the most recently used.
    fn touch(&mut self, id: u64) -> Option<Arc<File>> {
        let (file, used) = self.files.get_mut(&id)?;
        self.by_use.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.by_use.insert(self.clock, id);
        Some(Arc::clone(file))
    }

    /// Caches `file` for `id`; returns the files evicted to stay within
    /// the bound, for the caller to close outside the lock.
    fn insert(&mut self, id: u64, file: Arc<File>, max: usize) -> Vec<Arc<File>> {
        let mut evicted: Vec<Arc<File>> = self.remove(id).into_iter().collect();
        self.clock += 1;
        self.files.insert(id, (file, self.clock));
        self.by_use.insert(self.clock, id);
        while self.files.len() > max {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((file, _)) = self.files.remove(&oldest) {
                evicted.push(file);
            }
        }
        evicted
    }

    fn remove(&mut self, id: u64) -> Option<Arc<File>> {
        let (file, used) = self.files.remove(&id)?;
        self.by_use.remove(&used);
        Some(file)
    }

    /// Drops every file no operation is using (only the cache holds it).
    fn release_idle(&mut self) -> Vec<Arc<File>> {
        let idle: Vec<u64> = self
            .files
            .iter()
            .filter(|(_, (file, _))| Arc::strong_count(file) == 1)
            .map(|(&id, _)| id)
            .collect();
        let released: Vec<Arc<File>> = idle.iter().filter_map(|&id| self.remove(id)).collect();
        tracing::warn!(
            closed = released.len(),
            "out of file descriptors: closed idle segment files"
        );
        released
    }
}

fn lock() -> MutexGuard<'static, Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE
        .get_or_init(|| Mutex::new(Cache::default()))
        .lock()
        // The cache's invariants hold between statements that cannot
        // panic; a panic elsewhere while holding it leaves it usable.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_and_never_reopens_a_retired_segment() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let path = dir.path().join(format!("f{i}"));
                std::fs::write(&path, [i as u8]).expect("write");
                SegmentFile::new(path)
            })
            .collect();
        let mut cache = Cache::default();
        let open = |h: &SegmentFile| Arc::new(h.open().expect("open"));
        let max = 5;
        assert!(cache
            .insert(handles[0].id, open(&handles[0]), max)
            .is_empty());
        assert!(cache
            .insert(handles[1].id, open(&handles[1]), max)
            .is_empty());
        assert!(cache.touch(handles[0].id).is_some());
        // Fill to the bound: the next insert evicts the least recently
        // used, which is handles[1] (handles[0] was touched after it).
        for i in 0..max - 2 {
            assert!(cache
                .insert(1 << 40 | i as u64, open(&handles[2]), max)
                .is_empty());
        }
        assert_eq!(cache.touch(handles[0].id).map(drop), Some(()));
        let evicted = cache.insert(handles[2].id, open(&handles[2]), max);
        assert_eq!(evicted.len(), 1);
        assert!(cache.touch(handles[1].id).is_none());
        assert!(cache.touch(handles[0].id).is_some());
        assert_eq!(cache.files.len(), max);
        assert_eq!(cache.by_use.len(), max);

        handles[2].retire();
        let err = handles[2].get().expect_err("retired");
        assert!(is_retired(&err), "{err}");
        assert!(handles[1].get().is_ok());
    }
}
