//! The filesystem's state and operations, independent of FUSE's reply types:
//! the inode table (an `O_PATH` handle per inode the kernel knows), the
//! overlays of unsynced file data, the journal of unsynced directory entries,
//! and the power cut and clean shutdown that end a mount.
//!
//! Inode numbers on the mount are the backing inode numbers (the backing root
//! swapped with 1, FUSE's root), so a name's inode is stable across lookups,
//! renames and forgets. Every operation resolves names through the parent's
//! `O_PATH` handle (`/proc/self/fd/N/name`), never through a stored path, so a
//! renamed directory needs no bookkeeping.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use fuser::{Errno, FileType};

mod namespace;

use crate::journal::{at, remove_any, DirRef, Journal, TRASH};
use crate::overlay::Overlay;
use crate::rng::SplitMix64;
use crate::{CutOptions, CutStats, Pending};

pub(crate) type Res<T> = Result<T, Errno>;

/// Whether the mount still serves operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Live,
    /// Power was cut: every operation fails with EIO.
    Cut,
    /// Cleanly unmounted: every operation fails with EIO.
    Closed,
}

#[derive(Debug)]
struct Inode {
    /// `O_PATH | O_NOFOLLOW` handle: stat, reopen and `*at` parent for names.
    path: Arc<File>,
    /// Read-write handle for data, opened on first use.
    data: Option<Arc<File>>,
    nlookup: u64,
}

/// A directory listing taken at `opendir`, so offsets stay stable.
type Listing = Vec<(u64, FileType, OsString)>;

#[derive(Debug)]
pub(crate) struct Core {
    pub phase: Phase,
    root_st_ino: u64,
    sync_backing: bool,
    inodes: HashMap<u64, Inode>,
    overlays: HashMap<u64, Overlay>,
    next_overlay_seq: u64,
    journal: Journal,
    listings: HashMap<u64, Listing>,
    next_fh: u64,
}

impl Core {
    /// Opens the backing root and an empty trash directory in it.
    pub fn new(backing: &Path, sync_backing: bool) -> io::Result<Core> {
        let root = Arc::new(open_path(backing)?);
        let root_st_ino = root.metadata()?.ino();
        let trash_path = backing.join(TRASH);
        // A trash left by a daemon that died without a cut or unmount holds
        // objects whose removal nobody can undo any more: drop them.
        remove_any(&trash_path)?;
        std::fs::create_dir(&trash_path)?;
        let trash = Arc::new(open_path(&trash_path)?);
        let mut inodes = HashMap::new();
        inodes.insert(
            1,
            Inode {
                path: Arc::clone(&root),
                data: None,
                nlookup: 1,
            },
        );
        Ok(Core {
            phase: Phase::Live,
            root_st_ino,
            sync_backing,
            inodes,
            overlays: HashMap::new(),
            next_overlay_seq: 0,
            journal: Journal::new(trash),
            listings: HashMap::new(),
            next_fh: 1,
        })
    }

    pub fn check_live(&self) -> Res<()> {
        match self.phase {
            Phase::Live => Ok(()),
            Phase::Cut | Phase::Closed => Err(Errno::EIO),
        }
    }

    pub fn pending(&self) -> Pending {
        Pending {
            files: self.overlays.len() as u64,
            bytes: self.overlays.values().map(Overlay::pending_bytes).sum(),
            dir_changes: self.journal.len() as u64,
        }
    }

    /// Maps a backing inode number to the mount's (root is 1).
    fn ino_of(&self, st_ino: u64) -> u64 {
        if st_ino == self.root_st_ino {
            1
        } else if st_ino == 1 {
            self.root_st_ino
        } else {
            st_ino
        }
    }

    fn inode(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn dir_ref(&self, ino: u64) -> Res<DirRef> {
        Ok(DirRef {
            ino,
            fd: Arc::clone(&self.inode(ino)?.path),
        })
    }

    /// Refuses names that would reach the hidden trash directory.
    fn check_name(&self, parent: u64, name: &OsStr) -> Res<()> {
        if parent == 1 && name == TRASH {
            return Err(Errno::EPERM);
        }
        Ok(())
    }

    pub fn attr(&self, ino: u64) -> Res<fuser::FileAttr> {
        let meta = self.inode(ino)?.path.metadata()?;
        Ok(self.to_attr(&meta))
    }

    fn to_attr(&self, m: &Metadata) -> fuser::FileAttr {
        let ino = self.ino_of(m.ino());
        let size = self.overlays.get(&ino).map_or(m.size(), Overlay::size);
        fuser::FileAttr {
            ino: fuser::INodeNo(ino),
            size,
            blocks: m.blocks().max(size.div_ceil(512)),
            atime: m.accessed().unwrap_or(std::time::UNIX_EPOCH),
            mtime: m.modified().unwrap_or(std::time::UNIX_EPOCH),
            ctime: std::time::UNIX_EPOCH + std::time::Duration::new(m.ctime().max(0) as u64, 0),
            crtime: std::time::UNIX_EPOCH,
            kind: kind_of(m.file_type()),
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev() as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Resolves `name` in `parent`, counting one kernel reference.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<fuser::FileAttr> {
        if parent == 1 && name == TRASH {
            return Err(Errno::ENOENT);
        }
        let path = at(&self.inode(parent)?.path, name);
        let file = open_path(&path)?;
        let meta = file.metadata()?;
        let ino = self.ino_of(meta.ino());
        self.inodes
            .entry(ino)
            .and_modify(|i| i.nlookup += 1)
            .or_insert_with(|| Inode {
                path: Arc::new(file),
                data: None,
                nlookup: 1,
            });
        Ok(self.to_attr(&meta))
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlookup = i.nlookup.saturating_sub(n);
            if i.nlookup == 0 {
                self.inodes.remove(&ino);
            }
        }
    }

    /// The read-write handle of a file, opened on first use.
    fn data(&mut self, ino: u64) -> Res<Arc<File>> {
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        if let Some(d) = &inode.data {
            return Ok(Arc::clone(d));
        }
        let reopen = at(&inode.path, OsStr::new(""));
        let file = match File::options().read(true).write(true).open(&reopen) {
            Ok(f) => f,
            Err(_) => File::open(&reopen)?,
        };
        let file = Arc::new(file);
        inode.data = Some(Arc::clone(&file));
        Ok(file)
    }

    pub fn open(&mut self, ino: u64) -> Res<()> {
        self.data(ino).map(|_| ())
    }

    fn overlay(&mut self, ino: u64) -> Res<&mut Overlay> {
        if !self.overlays.contains_key(&ino) {
            let file = self.data(ino)?;
            let len = file.metadata()?.len();
            self.next_overlay_seq += 1;
            self.overlays
                .insert(ino, Overlay::new(file, self.next_overlay_seq, len));
        }
        self.overlays.get_mut(&ino).ok_or(Errno::EIO)
    }

    pub fn read(&mut self, ino: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        if let Some(o) = self.overlays.get(&ino) {
            return Ok(o.read(offset, size.into())?);
        }
        let file = self.data(ino)?;
        let mut buf = vec![0; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match std::os::unix::fs::FileExt::read_at(
                &*file,
                &mut buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Res<u32> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > i64::MAX as u64 {
            return Err(Errno::EFBIG);
        }
        self.overlay(ino)?.write(offset, data);
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    /// `fallocate` in its plain mode: the file grows to at least
    /// `offset + length` bytes reading as zeros, unsynced like any growth
    /// (a cut may take it back). Other modes (keep size, punch or zero a
    /// range) are not offered: `EOPNOTSUPP`, which applications treat as
    /// "this filesystem cannot preallocate".
    pub fn fallocate(&mut self, ino: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        if mode != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        if end > i64::MAX as u64 {
            return Err(Errno::EFBIG);
        }
        let overlay = self.overlay(ino)?;
        if end > overlay.size() {
            overlay.set_len(end);
        }
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file: its overlay reaches the backing file.
    /// Returns the backing file for the caller to sync after releasing the
    /// lock, so syncs of different files overlap. A cut that lands between
    /// the write-through and that sync keeps the data (the backing file
    /// already holds it): durable but not yet acknowledged, which a real disk
    /// allows too.
    pub fn fsync(&mut self, ino: u64) -> Res<Option<Arc<File>>> {
        let file = match self.overlays.remove(&ino) {
            Some(o) => {
                o.write_through()?;
                Arc::clone(&o.file)
            }
            None => self.data(ino)?,
        };
        Ok(self.sync_backing.then_some(file))
    }

    /// `fsync` of a directory: its pending entries become durable. Returns
    /// the backing directory to sync after releasing the lock.
    pub fn fsyncdir(&mut self, ino: u64) -> Res<Option<File>> {
        self.journal.fsync_dir(ino)?;
        if !self.sync_backing {
            return Ok(None);
        }
        Ok(Some(File::open(at(
            &self.inode(ino)?.path,
            OsStr::new(""),
        ))?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
    ) -> Res<fuser::FileAttr> {
        let path = at(&self.inode(ino)?.path, OsStr::new(""));
        if let Some(mode) = mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&path, uid, gid)?;
        }
        if atime.is_some() || mtime.is_some() {
            set_times(&path, atime, mtime)?;
        }
        if let Some(size) = size {
            if size > i64::MAX as u64 {
                return Err(Errno::EFBIG);
            }
            self.overlay(ino)?.set_len(size);
        }
        self.attr(ino)
    }

    pub fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*self.inode(ino)?.path);
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `fd` is a valid descriptor owned by the inode table for the
        // call's duration; the empty path reads the link `fd` refers to;
        // `buf` is writable for its length.
        let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    pub fn statfs(&self) -> Res<libc::statvfs> {
        let path = cstring(&at(&self.inode(1)?.path, OsStr::new("")))?;
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is writable.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(st)
    }

    /// The power cut: what was synced stays, everything else is dropped (or
    /// partly applied, per the faults), namespace changes are undone.
    pub fn power_cut(&mut self, opts: &CutOptions) -> CutStats {
        self.phase = Phase::Cut;
        let mut stats = CutStats::default();
        let mut rng = SplitMix64::new(opts.seed);
        let mut overlays: Vec<Overlay> = self.overlays.drain().map(|(_, o)| o).collect();
        overlays.sort_by_key(|o| o.seq);
        for o in &overlays {
            stats.files_with_unsynced_data += 1;
            match o.cut(&mut rng, opts.tear, opts.reorder) {
                Ok(out) => {
                    stats.writes_discarded += out.writes_discarded;
                    stats.writes_applied += out.writes_applied;
                    stats.bytes_discarded += out.bytes_discarded;
                    stats.files_torn += u64::from(out.torn);
                }
                Err(e) => stats.errors.push(format!("applying faults: {e}")),
            }
            if let Err(e) = o.file.sync_all() {
                stats.errors.push(format!("syncing a cut file: {e}"));
            }
        }
        let undone = self.journal.undo_all();
        stats.dir_changes_reverted = undone.entries;
        stats.errors.extend(undone.errors);
        self.drop_trash(&mut stats.errors);
        stats
    }

    /// Clean shutdown: everything pending becomes durable.
    pub fn close(&mut self) -> io::Result<()> {
        self.phase = Phase::Closed;
        let mut first_err = None;
        for (_, o) in self.overlays.drain() {
            if let Err(e) = o.write_through().and_then(|()| o.file.sync_all()) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.journal.commit_all() {
            first_err.get_or_insert(e);
        }
        let mut errors = Vec::new();
        self.drop_trash(&mut errors);
        if let Some(e) = errors.pop() {
            first_err.get_or_insert(io::Error::other(e));
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Removes the trash directory (every slot in it is committed or was
    /// restored) and syncs the backing root.
    fn drop_trash(&mut self, errors: &mut Vec<String>) {
        let root = match self.inode(1) {
            Ok(i) => Arc::clone(&i.path),
            Err(_) => return,
        };
        if let Err(e) = remove_any(&at(&root, OsStr::new(TRASH))) {
            errors.push(format!("removing the trash: {e}"));
        }
        if let Err(e) = File::open(at(&root, OsStr::new(""))).and_then(|f| f.sync_all()) {
            errors.push(format!("syncing the backing root: {e}"));
        }
    }
}

/// Opens an `O_PATH` handle that does not follow a final symlink.
fn open_path(path: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn kind_of(t: std::fs::FileType) -> FileType {
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else if t.is_fifo() {
        FileType::NamedPipe
    } else if t.is_socket() {
        FileType::Socket
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else if t.is_char_device() {
        FileType::CharDevice
    } else {
        FileType::RegularFile
    }
}

fn set_times(
    path: &Path,
    atime: Option<fuser::TimeOrNow>,
    mtime: Option<fuser::TimeOrNow>,
) -> io::Result<()> {
    fn spec(t: Option<fuser::TimeOrNow>) -> libc::timespec {
        match t {
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            Some(fuser::TimeOrNow::Now) => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            Some(fuser::TimeOrNow::SpecificTime(t)) => {
                let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                libc::timespec {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_nsec: d.subsec_nanos().into(),
                }
            }
        }
    }
    let times = [spec(atime), spec(mtime)];
    let path = cstring(path)?;
    // SAFETY: `path` is NUL-terminated and `times` holds two timespecs.
    if unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
