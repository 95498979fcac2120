//! Creating directories so that they survive a power cut.
//!
//! `mkdir` is a change to the parent directory's entries, and under strict
//! POSIX rules it is durable only once the parent is fsynced. ext4 and XFS
//! usually forgive a missing parent fsync; a power cut on a filesystem that
//! does not (the test suite's power-loss filesystem is one) would lose the
//! whole data dir, and with it every acknowledged record. Every directory
//! the broker creates therefore goes through [`create_dir_durable`].

use std::fs;
use std::io;
use std::path::Path;

/// Creates `path` and any missing ancestors, fsyncing each new directory's
/// parent (and the new directory itself) before returning. A directory that
/// already exists is left as is, but its parent is still fsynced: a crash
/// between an earlier `mkdir` and its parent's fsync leaves a directory
/// that exists in the page cache only.
pub fn create_dir_durable(path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(path);
    while let Some(p) = cur {
        if p.as_os_str().is_empty() || p.is_dir() {
            break;
        }
        missing.push(p);
        cur = p.parent();
    }
    for p in missing.iter().rev() {
        match fs::create_dir(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    sync_dir(path)?;
    // The topmost parent of what was created, and `path`'s own parent
    // when nothing was (see above), both get their entries synced.
    let mut synced_parent_of = missing.clone();
    if synced_parent_of.is_empty() {
        synced_parent_of.push(path);
    }
    for p in synced_parent_of {
        if let Some(parent) = p.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// fsyncs a directory, making its entries durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    fs::File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_ancestors_and_accepts_existing() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(create_dir_durable(&file.join("d")).is_err());
    }
}
