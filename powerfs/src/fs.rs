//! The FUSE adapter: each kernel request takes the core's lock, refuses with
//! EIO once power was cut or the mount closed, delegates to [`Core`], and
//! converts the answer into fuser's reply. Nothing here decides durability.
//! Several threads serve requests; the lock orders them, and only the
//! backing file's own sync runs outside it, so syncs of different files (a
//! broker's Raft groups) overlap as they would on a disk.
//!
//! Every open file is opened with `FOPEN_DIRECT_IO`, and writeback caching is
//! never requested, so every read and write reaches this process: the kernel
//! holds no page cache for the mount that could survive the cut. A
//! consequence: shared writable `mmap` is refused by the kernel with ENODEV
//! (private mappings work, read through this process).

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{
    Errno, FileHandle, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::core::Core;

/// How long the kernel may cache attributes and names. Every change goes
/// through this process, so the cache can only be stale after the mount
/// ended, when nothing is served anyway.
const TTL: Duration = Duration::from_secs(1);

/// The fuser `Filesystem`; the same core is shared with the [`crate::PowerFs`]
/// handle that cuts power or unmounts.
pub(crate) struct PowerFsOps {
    pub core: Arc<Mutex<Core>>,
}

impl PowerFsOps {
    /// The core, live. A panic while holding the lock leaves the core
    /// consistent enough to cut or unmount, so poisoning is ignored.
    fn live(&self) -> Result<MutexGuard<'_, Core>, Errno> {
        let core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        core.check_live()?;
        Ok(core)
    }
}

fn entry(reply: ReplyEntry, res: Result<fuser::FileAttr, Errno>) {
    match res {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, res: Result<(), Errno>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl fuser::Filesystem for PowerFsOps {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(
            reply,
            self.live().and_then(|mut c| c.lookup(parent.0, name)),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // Forgets count even after a cut, so the table empties as processes exit.
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.live().and_then(|c| c.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = self
            .live()
            .and_then(|mut c| c.setattr(ino.0, mode, uid, gid, size, atime, mtime));
        match res {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.live().and_then(|c| c.readlink(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.live()
                .and_then(|mut c| c.mknod(parent.0, name, mode & !umask)),
        );
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.live()
                .and_then(|mut c| c.mkdir(parent.0, name, mode & !umask)),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            self.live()
                .and_then(|mut c| c.remove(parent.0, name, false)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            self.live().and_then(|mut c| c.remove(parent.0, name, true)),
        );
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.live()
                .and_then(|mut c| c.symlink(parent.0, link_name, target)),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self
            .live()
            .and_then(|mut c| c.rename(parent.0, name, newparent.0, newname, flags));
        empty(reply, res);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry(
            reply,
            self.live()
                .and_then(|mut c| c.link(ino.0, newparent.0, newname)),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.live().and_then(|mut c| c.open(ino.0)) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.live().and_then(|mut c| c.read(ino.0, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.live().and_then(|mut c| c.write(ino.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.live()
                .and_then(|mut c| c.fallocate(ino.0, offset, length, mode)),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() makes nothing durable.
        empty(reply, self.live().map(|_| ()));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let file = match self.live().and_then(|mut c| c.fsync(ino.0)) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // The backing sync runs without the lock (see `Core::fsync`).
        let synced = match file {
            Some(f) if datasync => f.sync_data(),
            Some(f) => f.sync_all(),
            None => Ok(()),
        };
        empty(reply, synced.map_err(Errno::from));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.live().and_then(|mut c| c.opendir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.live().and_then(|c| {
            c.readdir(fh.0, offset, |ino, next, kind, name| {
                reply.add(INodeNo(ino), next, kind, name)
            })
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let dir = match self.live().and_then(|mut c| c.fsyncdir(ino.0)) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        empty(
            reply,
            dir.map_or(Ok(()), |d| d.sync_all()).map_err(Errno::from),
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.live().and_then(|c| c.statfs()) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`).
        empty(reply, self.live().map(|_| ()));
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let excl = flags & libc::O_EXCL != 0;
        let res = self
            .live()
            .and_then(|mut c| c.create(parent.0, name, mode & !umask, excl));
        match res {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }
}
