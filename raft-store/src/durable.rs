//! Directory durability: creating directories so that they survive a power
//! cut, and fsyncing a directory so that the names created, renamed or
//! removed in it do.
//!
//! A new file or directory is only durable once the directory holding its
//! name is fsynced (POSIX makes no promise before that; ext4 and XFS
//! usually forgive it, other file systems and a drive's volatile cache may
//! not). Every directory this crate creates goes through
//! [`create_dir_durable`], and every name it creates, renames or removes is
//! followed by a [`sync_dir`] of its directory before anything relies on it.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::Path;

use crate::error::StoreError;

/// Makes creations, renames and removals of files in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Creates `path` and any missing ancestors, fsyncing each new directory's
/// parent after creating it, so that the whole path survives a power cut.
/// If `path` already exists, its parent is fsynced anyway: an earlier run
/// may have created it and crashed before making it durable. Returns how
/// many directories it fsynced.
pub(crate) fn create_dir_durable_counted(path: &Path) -> Result<usize, StoreError> {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        match fs::metadata(at) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                let err = std::io::Error::new(ErrorKind::AlreadyExists, "not a directory");
                return Err(StoreError::io("create directory", at, err));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                missing.push(at);
                match at.parent().filter(|p| !p.as_os_str().is_empty()) {
                    Some(parent) => at = parent,
                    // A relative path whose first component is missing:
                    // its parent is the working directory.
                    None => break,
                }
            }
            Err(e) => return Err(StoreError::io("stat directory", at, e)),
        }
    }
    let mut synced = 0;
    for dir in missing.iter().rev() {
        match fs::create_dir(dir) {
            Ok(()) => {}
            // Created concurrently (another group opening beside this one).
            Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(StoreError::io("create directory", dir, e)),
        }
        sync_dir(parent_of(dir))?;
        synced += 1;
    }
    if missing.is_empty() {
        sync_dir(parent_of(path))?;
        synced += 1;
    }
    Ok(synced)
}

/// The directory holding `path`'s name (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        Some(_) => Path::new("."),
        // The root is its own parent.
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_one_fsync_per_new_level_or_one_for_an_existing_directory() {
        let root = tempfile::TempDir::new().expect("tempdir");
        let deep = root.path().join("a/b/c");
        assert_eq!(create_dir_durable_counted(&deep).expect("create"), 3);
        assert!(deep.is_dir());
        assert_eq!(create_dir_durable_counted(&deep).expect("exists"), 1);
        assert_eq!(
            create_dir_durable_counted(&root.path().join("a/x")).expect("one new"),
            1
        );
        assert_eq!(parent_of(Path::new("name")), Path::new("."));
        assert_eq!(parent_of(Path::new("/")), Path::new("/"));
    }
}
