//! The `covet-powerfs mount` binary: SIGUSR1 cuts power (also while another
//! process holds a file open on the mount), SIGTERM unmounts cleanly.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary mounted in the foreground, its stdout lines on a channel.
struct Mounted {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Mounted {
    fn start(backing: &Path, mnt: &Path, extra: &[&str]) -> Mounted {
        let mut child = Command::new(env!("CARGO_BIN_EXE_covet-powerfs"))
            .arg("mount")
            .arg(backing)
            .arg(mnt)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn covet-powerfs");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut m = Mounted { child, lines };
        let first = m.line();
        assert!(
            first.starts_with("mounted "),
            "FUSE is required; covet-powerfs said {first:?}"
        );
        m
    }

    fn line(&mut self) -> String {
        match self.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(e) => panic!(
                "no line from covet-powerfs within 30 s ({e}); status {:?}",
                self.child.try_wait()
            ),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: sending a signal to our own child by its pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    fn wait_success(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "covet-powerfs exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "covet-powerfs did not exit within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _already_exited = self.child.kill();
        let _reaped = self.child.wait();
    }
}

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&backing).expect("mkdir");
    fs::create_dir(&mnt).expect("mkdir");
    (dir, backing, mnt)
}

#[test]
fn sigusr1_cuts_power_while_another_process_holds_a_file_open() {
    let (_dir, backing, mnt) = dirs();
    let mut fs_proc = Mounted::start(&backing, &mnt, &["--seed", "3"]);
    let mut f = File::create(mnt.join("f")).expect("create");
    f.write_all(b"synced").expect("write");
    f.sync_data().expect("fdatasync");
    File::open(&mnt)
        .expect("open dir")
        .sync_all()
        .expect("fsync dir");
    f.write_all(b"+lost").expect("write");
    // A process that keeps the file open across the cut, like a broker that
    // is killed only afterwards.
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg("exec 3<\"$1\"; echo held; exec sleep 60")
        .arg("sh")
        .arg(mnt.join("f"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn holder");
    let mut held = String::new();
    BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut held)
        .expect("read");
    assert_eq!(held.trim(), "held");

    fs_proc.signal(libc::SIGUSR1);
    let stats = fs_proc.line();
    assert!(
        stats.starts_with("power cut: files=1 writes_discarded=1 "),
        "{stats}"
    );
    assert!(stats.contains("bytes_discarded=5 "), "{stats}");
    assert!(stats.ends_with("errors=0"), "{stats}");
    fs_proc.wait_success();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(fs::read(backing.join("f")).expect("read"), b"synced");
}

#[test]
fn sigterm_unmounts_cleanly_keeping_unsynced_data() {
    let (_dir, backing, mnt) = dirs();
    let mut fs_proc = Mounted::start(&backing, &mnt, &[]);
    fs::write(mnt.join("f"), b"unsynced but kept").expect("write");
    fs_proc.signal(libc::SIGTERM);
    assert_eq!(fs_proc.line(), "unmounted");
    fs_proc.wait_success();
    assert_eq!(
        fs::read(backing.join("f")).expect("read"),
        b"unsynced but kept"
    );
    assert_eq!(fs::read_dir(&mnt).expect("ls").count(), 0);
}
