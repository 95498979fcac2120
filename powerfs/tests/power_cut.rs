//! Real mounts: what survives a power cut, what does not, and what a clean
//! unmount keeps. Each test mounts a fresh backing directory, works through
//! the mountpoint, cuts (or unmounts) and then reads the backing directory
//! directly, as a restarted node would. A machine without FUSE fails these
//! tests with the mount error (scripts/install-test-deps provides it).

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use covet_powerfs::{CutOptions, CutStats, MountOptions, PowerFs};

/// A mounted powerfs over a fresh temporary backing directory.
struct Rig {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    fs: PowerFs,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).expect("mkdir backing");
        fs::create_dir(&mnt).expect("mkdir mnt");
        let fs = PowerFs::mount(&backing, &mnt, MountOptions::default()).unwrap_or_else(|e| {
            panic!("FUSE is required for these tests and mounting failed: {e}")
        });
        Rig {
            _dir: dir,
            backing,
            mnt,
            fs,
        }
    }

    fn m(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn b(&self, name: &str) -> PathBuf {
        self.backing.join(name)
    }

    fn cut(&self, opts: CutOptions) -> CutStats {
        let stats = self.fs.power_cut(opts).expect("power cut");
        assert!(stats.errors.is_empty(), "cut errors: {:?}", stats.errors);
        stats
    }

    /// Names in the backing directory (the trash must be gone after a cut).
    fn backing_names(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.b(dir))
            .expect("read backing dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// Runs a test body with a deadline: a hung FUSE operation fails the test
/// instead of hanging the suite.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _receiver_gone = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test did not finish within 60 s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("test body panicked (see above)"),
    }
}

fn fsync_dir(path: &Path) {
    File::open(path)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
}

/// Creates `path` with `data`, fdatasyncs it and fsyncs its directory.
fn durable_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).expect("create");
    f.write_all(data).expect("write");
    f.sync_data().expect("fdatasync");
    fsync_dir(path.parent().expect("parent"));
}

/// A nemesis thread can hold the handle and cut while others use the mount.
#[test]
fn the_handle_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<PowerFs>();
}

#[test]
fn synced_data_survives_and_unsynced_data_is_gone() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("synced"), b"durable");
        let mut f = File::create(rig.m("unsynced")).expect("create");
        f.write_all(b"volatile").expect("write");
        fsync_dir(&rig.mnt);
        // Read-your-writes before the cut.
        assert_eq!(fs::read(rig.m("unsynced")).expect("read"), b"volatile");
        assert_eq!(fs::read(rig.b("unsynced")).expect("read backing"), b"");
        assert!(rig.fs.pending().bytes >= 8);

        let stats = rig.cut(CutOptions::default());
        assert_eq!(stats.bytes_discarded, 8);
        assert_eq!(stats.writes_discarded, 1);
        assert!(stats.discarded_anything());
        assert_eq!(fs::read(rig.b("synced")).expect("read"), b"durable");
        assert_eq!(fs::read(rig.b("unsynced")).expect("read"), b"");
        assert_eq!(rig.backing_names(""), ["synced", "unsynced"]);
    });
}

#[test]
fn an_unsynced_append_after_a_synced_prefix_leaves_exactly_the_prefix() {
    bounded(|| {
        let rig = Rig::new();
        let path = rig.m("log");
        let f = File::create(&path).expect("create");
        fsync_dir(&rig.mnt);
        let mut expected = Vec::new();
        for i in 0..50u32 {
            let rec = format!("record-{i:04};");
            f.write_all_at(rec.as_bytes(), expected.len() as u64)
                .expect("pwrite");
            expected.extend_from_slice(rec.as_bytes());
            if i % 10 == 9 {
                f.sync_data().expect("fdatasync");
            }
        }
        // 49 was the last synced record; append more without a sync.
        let synced = expected.clone();
        f.write_all_at(b"tail-never-synced", expected.len() as u64)
            .expect("pwrite");
        assert_eq!(fs::read(&path).expect("read").len(), synced.len() + 17);

        let stats = rig.cut(CutOptions::default());
        assert_eq!(stats.bytes_discarded, 17);
        assert_eq!(fs::read(rig.b("log")).expect("read"), synced);
    });
}

#[test]
fn tear_leaves_a_strict_prefix_of_the_last_write() {
    bounded(|| {
        let rig = Rig::new();
        let f = File::create(rig.m("f")).expect("create");
        fsync_dir(&rig.mnt);
        f.write_all_at(b"synced|", 0).expect("pwrite");
        f.sync_data().expect("fdatasync");
        f.write_all_at(b"first|", 7).expect("pwrite");
        let last = b"0123456789abcdefghijklmnopqrstuvwxyz";
        f.write_all_at(last, 13).expect("pwrite");

        let stats = rig.cut(CutOptions {
            seed: 42,
            tear: true,
            reorder: false,
        });
        assert_eq!(stats.files_torn, 1);
        let got = fs::read(rig.b("f")).expect("read");
        assert!(got.starts_with(b"synced|first|"), "{got:?}");
        let kept = got.len() - 13;
        assert!(
            kept < last.len(),
            "the last write must be torn, kept {kept}"
        );
        assert_eq!(&got[13..], &last[..kept]);
        assert_eq!(stats.bytes_discarded, (last.len() - kept) as u64);
    });
}

/// Two unsynced writes to each of 16 files, then a reordering cut.
fn reorder_outcome(seed: u64) -> Vec<(bool, bool)> {
    let rig = Rig::new();
    let mut files = Vec::new();
    for i in 0..16 {
        let f = File::create(rig.m(&format!("f{i:02}"))).expect("create");
        files.push(f);
    }
    fsync_dir(&rig.mnt);
    for f in &files {
        f.write_all_at(&[b'a'; 100], 0).expect("pwrite");
        f.write_all_at(&[b'b'; 100], 100).expect("pwrite");
    }
    rig.cut(CutOptions {
        seed,
        tear: false,
        reorder: true,
    });
    (0..16)
        .map(|i| {
            let got = fs::read(rig.b(&format!("f{i:02}"))).expect("read");
            let first = got.len() >= 100 && got[..100] == [b'a'; 100];
            let second = got.len() == 200 && got[100..] == [b'b'; 100];
            // Whatever landed, nothing else did: absent bytes read as zeros.
            match (first, second) {
                (true, true) => {}
                (true, false) => assert_eq!(got.len(), 100),
                (false, true) => assert_eq!(got[..100], [0; 100]),
                (false, false) => assert!(got.is_empty(), "{got:?}"),
            }
            (first, second)
        })
        .collect()
}

#[test]
fn reorder_can_leave_a_later_write_without_an_earlier_one_deterministically() {
    bounded(|| {
        let outcome = reorder_outcome(7);
        assert!(
            outcome.iter().any(|&(first, second)| second && !first),
            "seed 7 should leave some file with the later write only: {outcome:?}"
        );
        assert!(
            outcome.iter().any(|&(first, second)| !first && !second),
            "{outcome:?}"
        );
        assert_eq!(
            reorder_outcome(7),
            outcome,
            "the same seed must give the same cut"
        );
    });
}

#[test]
fn truncate_durability_follows_fsync() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("kept"), &[7; 100]);
        durable_file(&rig.m("cut"), &[7; 100]);
        let kept = OpenOptions::new()
            .write(true)
            .open(rig.m("kept"))
            .expect("open");
        kept.set_len(10).expect("set_len");
        kept.set_len(50).expect("set_len");
        // The hidden bytes read as zeros, not as the old data.
        assert_eq!(fs::read(rig.m("kept")).expect("read")[10..], [0; 40]);
        let cut = OpenOptions::new()
            .write(true)
            .open(rig.m("cut"))
            .expect("open");
        cut.set_len(10).expect("set_len");
        cut.sync_all().expect("fsync");
        cut.set_len(200).expect("set_len");

        rig.cut(CutOptions::default());
        assert_eq!(fs::read(rig.b("kept")).expect("read"), [7; 100]);
        assert_eq!(fs::read(rig.b("cut")).expect("read"), [7; 10]);
    });
}

fn fallocate(file: &File, offset: i64, len: i64, mode: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `file` owns a valid descriptor for the duration of the call.
    match unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[test]
fn fallocate_grows_the_file_and_its_durability_follows_fsync() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("synced"), &[7; 100]);
        durable_file(&rig.m("unsynced"), &[7; 100]);
        let synced = OpenOptions::new()
            .read(true)
            .write(true)
            .open(rig.m("synced"))
            .expect("open");
        fallocate(&synced, 100, 4000, 0).expect("fallocate");
        assert_eq!(synced.metadata().expect("stat").len(), 4100);
        // Space inside the file already: nothing changes.
        fallocate(&synced, 0, 50, 0).expect("fallocate inside");
        assert_eq!(synced.metadata().expect("stat").len(), 4100);
        synced.write_all_at(&[9; 10], 100).expect("write");
        synced.sync_data().expect("fdatasync");
        let unsynced = OpenOptions::new()
            .write(true)
            .open(rig.m("unsynced"))
            .expect("open");
        fallocate(&unsynced, 0, 1000, 0).expect("fallocate");
        // Modes that keep the size or punch holes are not offered.
        let keep_size = fallocate(&unsynced, 0, 5000, libc::FALLOC_FL_KEEP_SIZE);
        assert_eq!(
            keep_size.expect_err("keep size").raw_os_error(),
            Some(libc::EOPNOTSUPP)
        );

        rig.cut(CutOptions::default());
        let mut expected = vec![7; 100];
        expected.extend_from_slice(&[9; 10]);
        expected.resize(4100, 0);
        assert_eq!(fs::read(rig.b("synced")).expect("read"), expected);
        assert_eq!(fs::read(rig.b("unsynced")).expect("read"), [7; 100]);
    });
}

#[test]
fn a_created_and_fdatasynced_file_needs_the_directory_fsync() {
    bounded(|| {
        let rig = Rig::new();
        fs::create_dir(rig.m("d")).expect("mkdir");
        fs::create_dir(rig.m("e")).expect("mkdir");
        fsync_dir(&rig.mnt);
        let mut f = File::create(rig.m("d/orphan")).expect("create");
        f.write_all(b"data").expect("write");
        f.sync_data().expect("fdatasync");
        durable_file(&rig.m("e/named"), b"data");
        assert_eq!(rig.fs.pending().dir_changes, 1);
        assert_eq!(rig.fs.pending().files, 0);

        let stats = rig.cut(CutOptions::default());
        assert_eq!(stats.dir_changes_reverted, 1);
        assert!(rig.backing_names("d").is_empty());
        assert_eq!(rig.backing_names(""), ["d", "e"]);
        assert_eq!(fs::read(rig.b("e/named")).expect("read"), b"data");
    });
}

#[test]
fn rename_durability_follows_the_directory_fsync() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("a"), b"A");
        durable_file(&rig.m("b"), b"B");
        durable_file(&rig.m("c"), b"C");
        durable_file(&rig.m("old-b"), b"old B");
        // Neither rename is followed by a directory fsync.
        fs::rename(rig.m("a"), rig.m("x")).expect("rename");
        fs::rename(rig.m("c"), rig.m("old-b")).expect("rename over");
        assert_eq!(fs::read(rig.m("old-b")).expect("read"), b"C");
        let stats = rig.cut(CutOptions::default());
        assert_eq!(stats.dir_changes_reverted, 2);
        assert_eq!(rig.backing_names(""), ["a", "b", "c", "old-b"]);
        assert_eq!(fs::read(rig.b("old-b")).expect("read"), b"old B");

        let rig = Rig::new();
        durable_file(&rig.m("a"), b"A");
        durable_file(&rig.m("old"), b"old");
        fs::rename(rig.m("a"), rig.m("old")).expect("rename over");
        fsync_dir(&rig.mnt);
        rig.cut(CutOptions::default());
        assert_eq!(rig.backing_names(""), ["old"]);
        assert_eq!(fs::read(rig.b("old")).expect("read"), b"A");
    });
}

#[test]
fn a_rename_across_directories_waits_for_both() {
    bounded(|| {
        let rig = Rig::new();
        fs::create_dir(rig.m("d")).expect("mkdir");
        fs::create_dir(rig.m("e")).expect("mkdir");
        fsync_dir(&rig.mnt);
        durable_file(&rig.m("d/f"), b"F");
        fs::rename(rig.m("d/f"), rig.m("e/g")).expect("rename");
        fsync_dir(&rig.m("e"));
        rig.cut(CutOptions::default());
        assert_eq!(rig.backing_names("d"), ["f"]);
        assert!(rig.backing_names("e").is_empty());

        let rig = Rig::new();
        fs::create_dir(rig.m("d")).expect("mkdir");
        fs::create_dir(rig.m("e")).expect("mkdir");
        fsync_dir(&rig.mnt);
        durable_file(&rig.m("d/f"), b"F");
        fs::rename(rig.m("d/f"), rig.m("e/g")).expect("rename");
        fsync_dir(&rig.m("e"));
        fsync_dir(&rig.m("d"));
        rig.cut(CutOptions::default());
        assert!(rig.backing_names("d").is_empty());
        assert_eq!(fs::read(rig.b("e/g")).expect("read"), b"F");
    });
}

#[test]
fn an_unlinked_file_reappears_without_the_directory_fsync() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("gone"), b"G");
        durable_file(&rig.m("back"), b"B");
        fs::remove_file(rig.m("gone")).expect("unlink");
        fsync_dir(&rig.mnt);
        fs::remove_file(rig.m("back")).expect("unlink");
        assert!(matches!(fs::metadata(rig.m("back")), Err(e) if e.kind() == ErrorKind::NotFound));
        rig.cut(CutOptions::default());
        assert_eq!(rig.backing_names(""), ["back"]);
        assert_eq!(fs::read(rig.b("back")).expect("read"), b"B");
    });
}

#[test]
fn mkdir_and_rmdir_durability_follow_the_parent_fsync() {
    bounded(|| {
        let rig = Rig::new();
        fs::create_dir(rig.m("kept")).expect("mkdir");
        fs::create_dir(rig.m("removed")).expect("mkdir");
        fsync_dir(&rig.mnt);
        fs::create_dir(rig.m("new")).expect("mkdir");
        // Contents synced into a directory whose own entry is not durable
        // vanish with it.
        durable_file(&rig.m("new/f"), b"F");
        fs::remove_dir(rig.m("removed")).expect("rmdir");
        fs::create_dir(rig.m("kept/sub")).expect("mkdir");
        fsync_dir(&rig.m("kept"));
        let stats = rig.cut(CutOptions::default());
        assert_eq!(stats.dir_changes_reverted, 2);
        assert_eq!(rig.backing_names(""), ["kept", "removed"]);
        assert_eq!(rig.backing_names("kept"), ["sub"]);
    });
}

#[test]
fn operations_after_the_cut_fail_with_eio() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("f"), b"data");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(rig.m("f"))
            .expect("open");
        let dir = File::open(&rig.mnt).expect("open dir");
        rig.cut(CutOptions::default());
        let eio = |r: std::io::Result<()>| {
            let e = r.expect_err("must fail after the cut");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        };
        eio(f.write_all_at(b"x", 0));
        eio(f.read_at(&mut [0; 4], 0).map(|_| ()));
        eio(f.sync_data());
        eio(dir.sync_all());
        // The mount is detached: the mountpoint is the empty directory again.
        assert_eq!(fs::read_dir(&rig.mnt).expect("read mnt").count(), 0);
        assert!(matches!(
            rig.fs.power_cut(CutOptions::default()),
            Err(covet_powerfs::Error::Ended)
        ));
    });
}

#[test]
fn a_clean_unmount_keeps_everything() {
    bounded(|| {
        let rig = Rig::new();
        fs::create_dir(rig.m("d")).expect("mkdir");
        fs::write(rig.m("d/f"), b"never synced").expect("write");
        durable_file(&rig.m("gone"), b"G");
        fs::remove_file(rig.m("gone")).expect("unlink");
        let Rig {
            _dir,
            backing,
            fs: powerfs,
            ..
        } = rig;
        powerfs.unmount().expect("unmount");
        assert_eq!(
            fs::read(backing.join("d/f")).expect("read"),
            b"never synced"
        );
        let names: Vec<_> = fs::read_dir(&backing)
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, ["d"]);
    });
}

#[test]
fn shared_writable_mmap_is_refused_cleanly() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("f"), &[1; 4096]);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(rig.m("f"))
            .expect("open");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        // SAFETY: a fresh mapping request of a valid fd; the result is only
        // compared with MAP_FAILED and unmapped if it succeeded.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            // SAFETY: `p` is the 4096-byte mapping created above.
            unsafe { libc::munmap(p, 4096) };
            panic!("a shared writable mapping would bypass the overlay");
        }
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENODEV)
        );
        let mut buf = Vec::new();
        File::open(rig.m("f"))
            .expect("open")
            .read_to_end(&mut buf)
            .expect("read");
        assert_eq!(buf, [1; 4096]);
    });
}

#[test]
fn entries_inside_a_directory_removed_for_good_still_revert_cleanly() {
    bounded(|| {
        let rig = Rig::new();
        fs::create_dir(rig.m("d")).expect("mkdir");
        fs::create_dir(rig.m("e")).expect("mkdir");
        fsync_dir(&rig.mnt);
        durable_file(&rig.m("e/moved"), b"M");
        // Entries in d that wait for an fsync of d, which never comes.
        fs::write(rig.m("d/f"), b"F").expect("create");
        fs::remove_file(rig.m("d/f")).expect("unlink");
        fs::rename(rig.m("e/moved"), rig.m("d/moved")).expect("rename");
        fs::remove_file(rig.m("d/moved")).expect("unlink");
        fs::remove_dir(rig.m("d")).expect("rmdir");
        fsync_dir(&rig.mnt);
        let stats = rig.cut(CutOptions::default());
        assert_eq!(stats.dir_changes_reverted, 4);
        assert_eq!(rig.backing_names(""), ["e"]);
        // e was never fsynced after the rename out of it: the name is back.
        assert_eq!(fs::read(rig.b("e/moved")).expect("read"), b"M");
    });
}

#[test]
fn the_same_backing_can_be_mounted_again_after_a_cut() {
    bounded(|| {
        let rig = Rig::new();
        durable_file(&rig.m("f"), b"one");
        let held = File::open(rig.m("f")).expect("open");
        rig.cut(CutOptions::default());
        // A node restarted on powerfs again, at the same mountpoint, while a
        // file of the old mount is still open.
        let again =
            PowerFs::mount(&rig.backing, &rig.mnt, MountOptions::default()).expect("remount");
        assert_eq!(fs::read(rig.m("f")).expect("read"), b"one");
        let f = OpenOptions::new()
            .append(true)
            .open(rig.m("f"))
            .expect("open");
        (&f).write_all(b"+two").expect("append");
        f.sync_data().expect("fdatasync");
        (&f).write_all(b"+lost").expect("append");
        let stats = again.power_cut(CutOptions::default()).expect("cut");
        assert_eq!(stats.bytes_discarded, 5);
        assert_eq!(fs::read(rig.b("f")).expect("read"), b"one+two");
        drop(held);
    });
}

/// The broker's promise in miniature: writers append and fdatasync
/// concurrently, the cut lands while they run, and every byte a writer saw
/// acknowledged by fdatasync is in the backing file, followed by nothing but
/// a prefix of what it wrote next.
#[test]
fn acknowledged_syncs_survive_a_cut_during_concurrent_writes() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    bounded(|| {
        let rig = Rig::new();
        let record = |w: usize, i: u64| format!("w{w}-record-{i:08}\n").into_bytes();
        let acked: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
        let mut writers = Vec::new();
        for w in 0..3 {
            let f = File::create(rig.m(&format!("log{w}"))).expect("create");
            let acked = Arc::clone(&acked);
            writers.push(std::thread::spawn(move || {
                let mut off = 0u64;
                for i in 0.. {
                    let rec = record(w, i);
                    if f.write_all_at(&rec, off).is_err() {
                        return;
                    }
                    off += rec.len() as u64;
                    if i % 5 == 4 {
                        if f.sync_data().is_err() {
                            return;
                        }
                        acked[w].store(off, Ordering::SeqCst);
                    }
                }
            }));
        }
        fsync_dir(&rig.mnt);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked.iter().any(|a| a.load(Ordering::SeqCst) < 20_000) {
            assert!(
                std::time::Instant::now() < deadline,
                "writers made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        rig.cut(CutOptions::default());
        for w in writers {
            w.join().expect("writer");
        }
        for (w, acked) in acked.iter().enumerate() {
            let got = fs::read(rig.b(&format!("log{w}"))).expect("read");
            let acked = acked.load(Ordering::SeqCst) as usize;
            assert!(
                got.len() >= acked,
                "writer {w}: {} bytes on disk, {acked} acknowledged",
                got.len()
            );
            let expected: Vec<u8> = (0..).flat_map(|i| record(w, i)).take(got.len()).collect();
            assert!(
                got == expected,
                "writer {w}: the disk holds something it never wrote"
            );
        }
    });
}
