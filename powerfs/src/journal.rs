//! The undo journal of directory entries not yet covered by a directory
//! `fsync`.
//!
//! Namespace changes are applied to the backing directory at once (so lookups
//! stay plain passthrough), and each one is recorded here with what undoes it.
//! An entry that removes a name (unlink, rmdir, a rename over an existing
//! name) moves the old object into the hidden trash directory instead of
//! deleting it, so undoing it is a rename back. An `fsync` of a directory
//! commits the entries that wait for that directory: a commit empties the
//! entry's trash slot for good. A power cut undoes the remaining entries
//! newest first.
//!
//! Why per-directory commits undone in reverse order are consistent: two
//! entries that touch the same name of the same directory wait for that
//! directory, and an `fsync` commits every entry recorded before it there, so
//! whenever a later entry on a name is committed the earlier ones are too.
//! Undoing only uncommitted entries, newest first, therefore never needs a
//! name that a committed entry still uses. A rename waits for both of its
//! directories (strict: on ext4 either one's fsync would commit it). The one
//! case where an uncommitted entry's directory no longer exists — its own
//! removal was committed in its parent — is handled by keeping such objects
//! in a limbo keyed by (directory, name) during the undo (see `Undoer`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

/// The name of the trash directory at the backing root, hidden from the mount.
pub(crate) const TRASH: &str = ".powerfs-trash";

/// A directory an entry lives in: its inode number on the mount (which keys
/// the `fsync`) and an `O_PATH` handle that stays valid across renames.
#[derive(Clone, Debug)]
pub(crate) struct DirRef {
    pub ino: u64,
    pub fd: Arc<File>,
}

impl DirRef {
    pub fn join(&self, name: &OsStr) -> PathBuf {
        at(&self.fd, name)
    }
}

/// The path of `name` inside the directory open as `fd`, through procfs, so
/// operations follow the directory wherever it has been renamed to.
pub(crate) fn at(fd: &File, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    if !name.is_empty() {
        p.push(name);
    }
    p
}

#[derive(Debug)]
enum Change {
    /// A name was created (file, directory, symlink, hard link).
    Created { dir: DirRef, name: OsString },
    /// A name was removed; its object waits in the trash.
    Removed {
        dir: DirRef,
        name: OsString,
        trash: OsString,
    },
    /// A name moved; what it replaced waits in the trash.
    Renamed {
        from: DirRef,
        from_name: OsString,
        to: DirRef,
        to_name: OsString,
        displaced: Option<OsString>,
    },
}

#[derive(Debug)]
struct Entry {
    change: Change,
    /// Directories (inode numbers) whose fsync this entry still waits for.
    waits_for: Vec<u64>,
}

/// Outcome of undoing the journal at a power cut.
#[derive(Debug, Default)]
pub(crate) struct Undone {
    pub entries: u64,
    pub errors: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct Journal {
    entries: Vec<Entry>,
    trash: Arc<File>,
    next_trash: u64,
}

impl Journal {
    pub fn new(trash: Arc<File>) -> Self {
        Journal {
            entries: Vec::new(),
            trash,
            next_trash: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// A fresh path in the trash to move a removed object to.
    pub fn trash_slot(&mut self) -> (OsString, PathBuf) {
        self.next_trash += 1;
        let name = OsString::from(self.next_trash.to_string());
        let path = at(&self.trash, &name);
        (name, path)
    }

    pub fn created(&mut self, dir: DirRef, name: &OsStr) {
        let waits_for = vec![dir.ino];
        let change = Change::Created {
            dir,
            name: name.to_owned(),
        };
        self.entries.push(Entry { change, waits_for });
    }

    pub fn removed(&mut self, dir: DirRef, name: &OsStr, trash: OsString) {
        let waits_for = vec![dir.ino];
        let change = Change::Removed {
            dir,
            name: name.to_owned(),
            trash,
        };
        self.entries.push(Entry { change, waits_for });
    }

    pub fn renamed(
        &mut self,
        from: (DirRef, &OsStr),
        to: (DirRef, &OsStr),
        displaced: Option<OsString>,
    ) {
        let mut waits_for = vec![from.0.ino];
        if to.0.ino != from.0.ino {
            waits_for.push(to.0.ino);
        }
        let change = Change::Renamed {
            from: from.0,
            from_name: from.1.to_owned(),
            to: to.0,
            to_name: to.1.to_owned(),
            displaced,
        };
        self.entries.push(Entry { change, waits_for });
    }

    /// An `fsync` of directory `ino`: commits every entry that waited only
    /// for it, deleting their trash for good.
    pub fn fsync_dir(&mut self, ino: u64) -> io::Result<()> {
        let mut first_err = None;
        let trash = Arc::clone(&self.trash);
        self.entries.retain_mut(|e| {
            e.waits_for.retain(|&d| d != ino);
            if !e.waits_for.is_empty() {
                return true;
            }
            if let Err(err) = commit(&trash, &e.change) {
                first_err.get_or_insert(err);
            }
            false
        });
        first_err.map_or(Ok(()), Err)
    }

    /// Makes every entry durable (a clean unmount).
    pub fn commit_all(&mut self) -> io::Result<()> {
        let mut first_err = None;
        for e in self.entries.drain(..) {
            if let Err(err) = commit(&self.trash, &e.change) {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reverts every uncommitted entry, newest first (a power cut).
    pub fn undo_all(&mut self) -> Undone {
        let mut out = Undone::default();
        let mut undoer = Undoer {
            trash: &self.trash,
            limbo: HashMap::new(),
        };
        while let Some(e) = self.entries.pop() {
            out.entries += 1;
            if let Err(err) = undoer.undo(&e.change) {
                out.errors.push(format!("undo {:?}: {err}", e.change));
            }
        }
        // Objects left in limbo belong to directories that are gone for good;
        // they are deleted with the trash.
        out
    }
}

fn commit(trash: &File, change: &Change) -> io::Result<()> {
    match change {
        Change::Created { .. } => Ok(()),
        Change::Removed { trash: slot, .. } => remove_any(&at(trash, slot)),
        Change::Renamed { displaced, .. } => match displaced {
            Some(slot) => remove_any(&at(trash, slot)),
            None => Ok(()),
        },
    }
}

/// Undoes entries newest first. A directory whose own removal was committed
/// (fsynced in its parent) is gone for good, yet entries inside it may still
/// wait for its fsync; their objects are tracked in `limbo` by (directory,
/// name) so that an older entry can still move them to a directory that
/// exists (a rename out of a surviving directory into the gone one reverts).
struct Undoer<'a> {
    trash: &'a File,
    limbo: HashMap<(u64, OsString), PathBuf>,
}

impl Undoer<'_> {
    fn undo(&mut self, change: &Change) -> io::Result<()> {
        match change {
            Change::Created { dir, name } => match self.take(dir, name) {
                Some(path) => remove_any(&path),
                None => Ok(()),
            },
            Change::Removed {
                dir,
                name,
                trash: slot,
            } => self.put(at(self.trash, slot), dir, name),
            Change::Renamed {
                from,
                from_name,
                to,
                to_name,
                displaced,
            } => {
                if let Some(path) = self.take(to, to_name) {
                    self.put(path, from, from_name)?;
                }
                match displaced {
                    Some(slot) => self.put(at(self.trash, slot), to, to_name),
                    None => Ok(()),
                }
            }
        }
    }

    /// Where the object named `name` in `dir` is now.
    fn take(&mut self, dir: &DirRef, name: &OsStr) -> Option<PathBuf> {
        if exists(dir) {
            Some(dir.join(name))
        } else {
            self.limbo.remove(&(dir.ino, name.to_owned()))
        }
    }

    /// Gives the object at `path` the name `name` in `dir`.
    fn put(&mut self, path: PathBuf, dir: &DirRef, name: &OsStr) -> io::Result<()> {
        if exists(dir) {
            std::fs::rename(path, dir.join(name))
        } else {
            self.limbo.insert((dir.ino, name.to_owned()), path);
            Ok(())
        }
    }
}

/// Whether a directory still exists (a deleted one has no links).
fn exists(dir: &DirRef) -> bool {
    dir.fd.metadata().is_ok_and(|m| m.nlink() > 0)
}

/// Removes a file, symlink or whole directory tree.
pub(crate) fn remove_any(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
