//! Test support: a real `covet broker` process in a temp dir, for the
//! client's tests.
//!
//! Cargo gives a package's integration tests the path of that package's own
//! binaries only (`CARGO_BIN_EXE_*`), and `covet` belongs to the broker
//! crate, so the binary is found the way `cluster-tests/src/bin_path.rs`
//! finds it: `COVET_BIN` if set, else `cargo build -p covet-broker --bin
//! covet` into the target directory this test executable lives in (a no-op
//! when it is fresh). The broker listens on an ephemeral loopback port;
//! readiness is the `ready` line it prints, awaited with a deadline. The
//! process is killed and its directory removed when the handle drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The `covet` binary, built once per test process; see the module docs.
pub fn covet_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("COVET_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("test executable path");
        let mut profile_dir = exe.parent().expect("test directory").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let target_dir = profile_dir.parent().expect("target directory");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile name");
        // Cargo sets the manifest directory at run time too; the compile-time
        // one is only a fallback (a shared target directory may hold a test
        // binary built from a checkout at another path).
        let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        let workspace = manifest_dir.parent().expect("workspace");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args(["build", "--quiet", "-p", "covet-broker", "--bin", "covet"])
            .arg("--target-dir")
            .arg(target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = cmd.output().expect("run cargo build for covet");
        assert!(
            out.status.success(),
            "cargo build -p covet-broker failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir.join("covet")
    })
    .clone()
}

/// A fresh directory under the system temp dir, removed by [`Broker`]'s
/// drop.
fn temp_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "covet-client-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

pub struct Broker {
    child: Child,
    pub addr: String,
    dir: PathBuf,
    stopped: bool,
}

impl Broker {
    /// Starts a single-node broker and waits for its `ready` line.
    pub fn start() -> Broker {
        let dir = temp_dir();
        let mut child = Command::new(covet_bin())
            .arg("broker")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn covet broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("broker did not print a ready line in time");
            if line.contains("ready") {
                break line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .expect("ready line names the address")
                    .to_string();
            }
        };
        Broker {
            child,
            addr,
            dir,
            stopped: false,
        }
    }

    /// SIGSTOP, and waits until the kernel reports the process stopped:
    /// it keeps its sockets (the client's writes are buffered) but answers
    /// nothing.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.stopped = true;
        let stat = format!("/proc/{}/stat", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        // The state is the field after the parenthesised command name.
        while !std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('T'))
        }) {
            assert!(Instant::now() < deadline, "broker did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.stopped = false;
    }

    fn signal(&self, sig: &str) {
        assert!(send_signal(self.child.id(), sig), "kill {sig} failed");
    }
}

fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.stopped {
            send_signal(self.child.id(), "-CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
