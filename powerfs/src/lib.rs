//! `covet-powerfs`: a FUSE filesystem for tests that forgets, at a simulated
//! power cut, everything a strict POSIX disk with a volatile cache may forget.
//!
//! It passes every operation through to a backing directory, except that:
//!
//! - **File data** written since the file's last `fsync`/`fdatasync` stays in
//!   memory (an overlay of extents and a pending length per inode, see
//!   `overlay.rs`); reads see it. An `fsync` or `fdatasync` of the file writes
//!   the overlay through to the backing file and syncs that. Closing a file
//!   makes nothing durable. Size changes (`ftruncate`, `set_len`) are pending
//!   data too.
//! - **Directory entries** created, removed or renamed since the last `fsync`
//!   of their directory (FUSE `fsyncdir`) are not durable. They are applied to
//!   the backing directory at once and recorded in an undo journal
//!   (`journal.rs`); a removed or replaced object moves to a hidden trash
//!   directory (`.powerfs-trash` at the backing root, invisible on the mount)
//!   instead of being deleted, until the directory's fsync commits the
//!   removal. A rename waits for the fsync of both its directories. File data
//!   and names are independent: `fdatasync` of a new file does not make its
//!   name durable, and a directory fsync does not make file data durable.
//!
//! [`PowerFs::power_cut`] drops, at one instant (under the lock every
//! operation takes), all unsynced file data and reverts every uncommitted
//! directory entry newest first, so the backing directory holds exactly what
//! was synced — a file created and fdatasynced in a never-synced directory
//! disappears, an unlinked file reappears, a rename reverts. Optional seeded
//! faults ([`CutOptions`]) let part of the unsynced data reach the disk:
//! `tear` writes each file's unsynced writes in order with the last one cut at
//! a random byte; `reorder` writes a random subset of them (so a later write
//! can land without an earlier one); with both, the last write of the subset
//! is torn. Afterwards every operation on the mount fails with EIO and the
//! mount is detached (lazily, so processes that still hold files open get EIO
//! until they exit). [`PowerFs::unmount`] is the clean teardown: everything
//! pending is made durable first.
//!
//! The kernel keeps no cache that could outlive the cut: files are opened with
//! `FOPEN_DIRECT_IO` and writeback caching is never requested, so every read
//! and write reaches this process. Shared writable `mmap` is therefore
//! refused by the kernel (ENODEV); `pread`/`pwrite`, as sled and the Raft log
//! use, work.
//!
//! The FUSE session runs on a background thread of the process that calls
//! [`PowerFs::mount`]; the program under test (a broker) runs in another
//! process and opens files through the mountpoint. The binary
//! `covet-powerfs mount BACKING MOUNTPOINT` does the same in the foreground:
//! SIGUSR1 cuts power (with `--seed`, `--tear`, `--reorder`), SIGTERM or
//! SIGINT unmounts cleanly; it prints one line when mounted and one line of
//! statistics when it ends.
//!
//! Mounting needs `/dev/fuse` and either root (fuser then calls `mount(2)`
//! itself) or the setuid `fusermount3` from Debian's `fuse3` package, which
//! `scripts/install-test-deps` installs. fuser is built without libfuse, so no
//! `-dev` package is involved. The same backing directory can be mounted again
//! after a cut, as a node restarted on powerfs would be.
//!
//! Limits: one backing filesystem (inode numbers are the backing ones); no
//! extended attributes, no locks through the daemon (the kernel keeps local
//! locks), no `RENAME_EXCHANGE`, only regular files from `mknod`; metadata
//! other than size (mode, owner, times) is written through at once, not held
//! back until a sync; an unlinked file that is still open reports the link
//! count of its trash name. The backing directory is meaningful only after a
//! power cut or a clean unmount (while mounted it holds the volatile
//! namespace and only synced data). Memory grows with the unsynced bytes
//! between two syncs of a file (a file rewritten in place is compacted). All
//! operations run under one lock, which keeps the cut atomic; only the
//! backing `fsync` itself runs outside it.

mod core;
mod fs;
mod journal;
mod overlay;
mod rng;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::core::{Core, Phase};

/// Threads serving FUSE requests. They share one lock; more than one lets
/// the backing syncs of different files overlap.
const SESSION_THREADS: usize = 4;

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Whether `fsync` on the mount also syncs the backing file or directory
    /// (true models a real disk; false is faster when the host itself will
    /// not lose power during the test).
    pub sync_backing: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { sync_backing: true }
    }
}

/// Which faults a power cut injects; the same seed and workload give the same
/// outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutOptions {
    pub seed: u64,
    /// The last unsynced write of each file that reaches the disk lands only
    /// up to a random byte (without `reorder`: all earlier unsynced writes of
    /// the file land whole).
    pub tear: bool,
    /// Each unsynced operation of a file reaches the disk or not, by a seeded
    /// coin, independently of the order they were issued in.
    pub reorder: bool,
}

/// What a power cut did, so a test can assert that it discarded something.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutStats {
    /// Files that had unsynced data or size changes.
    pub files_with_unsynced_data: u64,
    /// Unsynced writes that did not reach the disk at all.
    pub writes_discarded: u64,
    /// Unsynced writes that reached the disk (whole or torn) through faults.
    pub writes_applied: u64,
    /// Unsynced bytes lost, including the cut-off part of torn writes.
    pub bytes_discarded: u64,
    /// Files whose last landed write was torn.
    pub files_torn: u64,
    /// Directory entries reverted (creates, removals, renames).
    pub dir_changes_reverted: u64,
    /// Anything that went wrong restoring the backing directory; empty when
    /// the backing directory is exactly the synced state.
    pub errors: Vec<String>,
}

impl CutStats {
    /// Whether the cut lost anything at all.
    pub fn discarded_anything(&self) -> bool {
        self.bytes_discarded > 0
            || self.dir_changes_reverted > 0
            || self.files_with_unsynced_data > 0
    }
}

/// What is not yet durable on a live mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Files with unsynced data or size changes.
    pub files: u64,
    /// Bytes of unsynced writes held in memory.
    pub bytes: u64,
    /// Directory entries waiting for a directory fsync.
    pub dir_changes: u64,
}

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("preparing backing directory {backing}: {source}")]
    Backing { backing: PathBuf, source: io::Error },
    #[error(
        "mounting powerfs on {mountpoint}: {source} (FUSE needs /dev/fuse and root, \
         or `fusermount3` from Debian's fuse3 package: run scripts/install-test-deps)"
    )]
    Mount {
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("the mount has already ended (power cut or unmounted)")]
    Ended,
    #[error("clean unmount could not make everything durable: {0}")]
    Flush(io::Error),
    #[error("unmounting {mountpoint}: {source}")]
    Unmount {
        mountpoint: PathBuf,
        source: io::Error,
    },
}

/// A mounted power-loss filesystem whose FUSE session runs on a background
/// thread of this process. Dropping it unmounts cleanly (like [`unmount`]) if
/// power was not cut.
///
/// [`unmount`]: PowerFs::unmount
pub struct PowerFs {
    core: Arc<Mutex<Core>>,
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Receives the session thread's result when the kernel connection ends
    /// (in a mutex so that the handle is `Sync`: a nemesis thread may cut).
    done: Mutex<mpsc::Receiver<io::Result<()>>>,
}

impl std::fmt::Debug for PowerFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerFs")
            .field("backing", &self.backing)
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl PowerFs {
    /// Mounts `backing` (an existing directory) on `mountpoint` (an existing
    /// empty directory). Returns once the kernel has completed the FUSE
    /// handshake, so the mount is usable.
    pub fn mount(backing: &Path, mountpoint: &Path, opts: MountOptions) -> Result<PowerFs, Error> {
        let backing_err = |source| Error::Backing {
            backing: backing.to_owned(),
            source,
        };
        let backing = backing.canonicalize().map_err(backing_err)?;
        raise_fd_limit();
        let core = Core::new(&backing, opts.sync_backing).map_err(backing_err)?;
        let core = Arc::new(Mutex::new(core));
        let ops = fs::PowerFsOps {
            core: Arc::clone(&core),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("covet-powerfs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::RW,
        ];
        config.n_threads = Some(SESSION_THREADS);
        let mount_err = |source| Error::Mount {
            mountpoint: mountpoint.to_owned(),
            source,
        };
        let session = match fuser::Session::new(ops, mountpoint, &config) {
            Ok(s) => s,
            Err(e) => {
                // Nothing was written through the mount: only the trash to drop.
                let _closed = lock(&core).close();
                return Err(mount_err(e));
            }
        };
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("covet-powerfs".into())
            .spawn(move || {
                let _receiver_gone = tx.send(session.run());
            })
            .map_err(mount_err)?;
        Ok(PowerFs {
            core,
            backing,
            mountpoint: mountpoint.to_owned(),
            done: Mutex::new(done),
        })
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What a power cut now would lose (zeros once the mount ended).
    pub fn pending(&self) -> Pending {
        lock(&self.core).pending()
    }

    /// Cuts power: see the crate documentation. Afterwards the backing
    /// directory holds only synced state (plus what the faults let through),
    /// every operation on the mount fails with EIO, and the mount is detached.
    pub fn power_cut(&self, opts: CutOptions) -> Result<CutStats, Error> {
        let stats = {
            let mut core = lock(&self.core);
            if core.phase != Phase::Live {
                return Err(Error::Ended);
            }
            core.power_cut(&opts)
        };
        self.detach(true)?;
        Ok(stats)
    }

    /// Clean unmount: everything pending becomes durable, then the mount
    /// goes away (lazily if a process still has a file open there).
    pub fn unmount(self) -> Result<(), Error> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<(), Error> {
        let flushed = {
            let mut core = lock(&self.core);
            if core.phase != Phase::Live {
                return Ok(());
            }
            core.close()
        };
        self.detach(false)?;
        flushed.map_err(Error::Flush)
    }

    /// Unmounts (lazily when `lazy` or when busy) and waits briefly for the
    /// session thread; it keeps answering EIO while files stay open.
    fn detach(&self, lazy: bool) -> Result<(), Error> {
        let unmount_err = |source| Error::Unmount {
            mountpoint: self.mountpoint.clone(),
            source,
        };
        let path = CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|_| unmount_err(io::ErrorKind::InvalidInput.into()))?;
        let umount = |flags| {
            // SAFETY: `path` is a valid NUL-terminated string.
            if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let res = if lazy {
            umount(libc::MNT_DETACH)
        } else {
            umount(0)
        };
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                umount(libc::MNT_DETACH).map_err(unmount_err)?
            }
            Err(e) => return Err(unmount_err(e)),
        }
        // With no file left open the kernel ends the connection at once.
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let _ended = done.recv_timeout(Duration::from_millis(500));
        Ok(())
    }
}

impl Drop for PowerFs {
    fn drop(&mut self) {
        let _best_effort = self.shutdown();
    }
}

/// Raises this process's soft limit on open files to the hard limit: the
/// daemon holds a handle per inode the kernel knows (and one more per open
/// file), which a broker's segments and sled's files can push past a soft
/// limit of 1024. Best effort: the mount works without it until it runs out.
fn raise_fd_limit() {
    // SAFETY: an all-zero rlimit is a valid value of this plain C struct.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is writable; then it is only read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The core's lock; a panic in an operation leaves it usable for the cut.
fn lock(core: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}
