//! Namespace operations: create, mkdir, symlink, link, unlink, rmdir,
//! rename and directory listings. Each change is applied to the backing
//! directory at once and recorded in the journal with what undoes it; a name
//! that goes away moves to the trash instead of being deleted.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use fuser::{Errno, FileType};

use super::{cstring, kind_of, Core, Listing, Res};
use crate::journal::{at, TRASH};

impl Core {
    /// Creates and opens a regular file; records the new name unless it
    /// already existed.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        excl: bool,
    ) -> Res<fuser::FileAttr> {
        self.check_name(parent, name)?;
        let dir = self.dir_ref(parent)?;
        let path = dir.join(name);
        let mut opts = File::options();
        opts.read(true).write(true).mode(mode & 0o7777);
        let (file, created) = match opts.clone().create_new(true).open(&path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !excl => {
                (opts.open(&path)?, false)
            }
            Err(e) => return Err(e.into()),
        };
        if created {
            self.journal.created(dir, name);
        }
        let attr = self.lookup(parent, name)?;
        if let Some(i) = self.inodes.get_mut(&attr.ino.0) {
            i.data.get_or_insert_with(|| Arc::new(file));
        }
        Ok(attr)
    }

    pub fn mknod(&mut self, parent: u64, name: &OsStr, mode: u32) -> Res<fuser::FileAttr> {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EPERM);
        }
        self.create(parent, name, mode, true)
    }

    pub fn mkdir(&mut self, parent: u64, name: &OsStr, mode: u32) -> Res<fuser::FileAttr> {
        self.check_name(parent, name)?;
        let dir = self.dir_ref(parent)?;
        std::fs::DirBuilder::new()
            .mode(mode & 0o7777)
            .create(dir.join(name))?;
        self.journal.created(dir, name);
        self.lookup(parent, name)
    }

    pub fn symlink(&mut self, parent: u64, name: &OsStr, target: &Path) -> Res<fuser::FileAttr> {
        self.check_name(parent, name)?;
        let dir = self.dir_ref(parent)?;
        std::os::unix::fs::symlink(target, dir.join(name))?;
        self.journal.created(dir, name);
        self.lookup(parent, name)
    }

    pub fn link(&mut self, ino: u64, parent: u64, name: &OsStr) -> Res<fuser::FileAttr> {
        self.check_name(parent, name)?;
        let dir = self.dir_ref(parent)?;
        let src = cstring(&at(&self.inode(ino)?.path, OsStr::new("")))?;
        let dst = cstring(&dir.join(name))?;
        // SAFETY: both paths are valid NUL-terminated strings for the call's
        // duration. AT_SYMLINK_FOLLOW makes the procfs link name the inode.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error().into());
        }
        self.journal.created(dir, name);
        self.lookup(parent, name)
    }

    /// unlink and rmdir: the object moves to the trash until the directory's
    /// fsync commits the removal.
    pub fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Res<()> {
        if parent == 1 && name == TRASH {
            return Err(Errno::ENOENT);
        }
        let dir = self.dir_ref(parent)?;
        let path = dir.join(name);
        let meta = std::fs::symlink_metadata(&path)?;
        match (want_dir, meta.is_dir()) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if std::fs::read_dir(&path)?.next().is_some() => {
                return Err(Errno::ENOTEMPTY)
            }
            _ => {}
        }
        let (slot, slot_path) = self.journal.trash_slot();
        std::fs::rename(&path, slot_path)?;
        self.journal.removed(dir, name, slot);
        Ok(())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: fuser::RenameFlags,
    ) -> Res<()> {
        if flags
            .intersects(fuser::RenameFlags::RENAME_EXCHANGE | fuser::RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        if parent == 1 && name == TRASH {
            return Err(Errno::ENOENT);
        }
        self.check_name(new_parent, new_name)?;
        let from = self.dir_ref(parent)?;
        let to = self.dir_ref(new_parent)?;
        let src = from.join(name);
        let dst = to.join(new_name);
        let src_meta = std::fs::symlink_metadata(&src)?;
        let displaced = match std::fs::symlink_metadata(&dst) {
            Ok(dst_meta) => {
                if flags.contains(fuser::RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if dst_meta.ino() == src_meta.ino() {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(());
                }
                match (src_meta.is_dir(), dst_meta.is_dir()) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if std::fs::read_dir(&dst)?.next().is_some() => {
                        return Err(Errno::ENOTEMPTY)
                    }
                    _ => {}
                }
                let (slot, slot_path) = self.journal.trash_slot();
                std::fs::rename(&dst, &slot_path)?;
                Some((slot, slot_path))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = std::fs::rename(&src, &dst) {
            if let Some((_, slot_path)) = &displaced {
                // Put the displaced object back; the rename never happened.
                let _restored = std::fs::rename(slot_path, &dst);
            }
            return Err(e.into());
        }
        self.journal
            .renamed((from, name), (to, new_name), displaced.map(|d| d.0));
        Ok(())
    }

    pub fn opendir(&mut self, ino: u64) -> Res<u64> {
        let path = at(&self.inode(ino)?.path, OsStr::new(""));
        let mut list: Listing = vec![
            (ino, FileType::Directory, ".".into()),
            (ino, FileType::Directory, "..".into()),
        ];
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let name = entry.file_name();
            if ino == 1 && name == TRASH {
                continue;
            }
            let kind = kind_of(entry.file_type()?);
            list.push((
                self.ino_of(std::os::unix::fs::DirEntryExt::ino(&entry)),
                kind,
                name,
            ));
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.listings.insert(fh, list);
        Ok(fh)
    }

    /// Entries of listing `fh` from `offset` on; the closure returns true
    /// when the reply buffer is full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Res<()> {
        let list = self.listings.get(&fh).ok_or(Errno::EBADF)?;
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&mut self, fh: u64) {
        self.listings.remove(&fh);
    }
}
