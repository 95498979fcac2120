//! Test support: real `covet broker` processes in temp dirs.
//!
//! A broker is started on an ephemeral loopback port; readiness is the
//! `ready` line it prints, awaited with a deadline (never a sleep). Children
//! are killed when their handle drops.

#![allow(dead_code)]

pub mod nats;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `covet` binary under test.
pub fn covet_bin() -> &'static str {
    env!("CARGO_BIN_EXE_covet")
}

pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    extra: Vec<String>,
    lines: Option<mpsc::Receiver<String>>,
    /// Soft and hard `RLIMIT_NOFILE` the process starts with, if set.
    fd_limit: Option<u64>,
    /// What `--listen` gets: an ephemeral port, or the address it had
    /// (see [`Broker::restart_same_address`]).
    listen: String,
}

impl Broker {
    /// Starts a broker on `dir` with extra flags.
    pub fn start(dir: &Path, extra: &[&str]) -> Broker {
        let mut b = Broker {
            child: None,
            addr: String::new(),
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            lines: None,
            fd_limit: None,
            listen: "127.0.0.1:0".into(),
        };
        b.spawn();
        b
    }

    /// Like [`Broker::start`], with soft and hard open-file limits of
    /// `limit` (restarts keep it), so the broker cannot raise them.
    pub fn start_with_fd_limit(dir: &Path, extra: &[&str], limit: u64) -> Broker {
        let mut b = Broker {
            child: None,
            addr: String::new(),
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            lines: None,
            fd_limit: Some(limit),
            listen: "127.0.0.1:0".into(),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let mut command = Command::new(covet_bin());
        if let Some(limit) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the child between fork and exec and only
            // calls setrlimit, which is async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .arg("broker")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.listen, "--log-level", "warn"])
            .args(&self.extra)
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
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("broker did not print a ready line in time");
            if line.contains("ready") {
                let addr = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .expect("ready line names the address");
                self.addr = addr.to_string();
                break;
            }
        }
        self.child = Some(child);
        self.lines = Some(rx);
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("broker running");
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        c.wait().expect("wait broker")
    }

    /// Lines the broker printed after `ready`, waiting up to `timeout` for
    /// one containing `needle`.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> bool {
        let Some(rx) = &self.lines else { return false };
        let deadline = Instant::now() + timeout;
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.contains(needle) {
                return true;
            }
        }
        false
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts the broker again on the same data dir (new port).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the broker again on the same data dir and address, so that
    /// clients holding the address (a bridge, a service) find it again.
    pub fn restart_same_address(&mut self) {
        self.kill9();
        self.listen = self.addr.clone();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `cond` until it holds or `timeout` passes; the polling interval is
/// short and the deadline bounds the wait.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(timeout, || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Polls `probe` until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `topic`/`p` from `from` up to its high watermark when the stream
/// opens. Opening is retried for up to 30 s while the partition is not
/// served yet (right after a restart it elects a leader again); each batch
/// must arrive within 10 s.
pub async fn read_partition(
    client: &covet_client::Client,
    topic: &str,
    p: u32,
    from: covet_client::StartPosition,
) -> Vec<covet_client::ConsumedRecord> {
    let stream = wait_for(Duration::from_secs(30), || async {
        client.open_partition(topic, p, from, 5_000).await.ok()
    })
    .await;
    let mut stream = stream.unwrap_or_else(|| panic!("{topic}/{p} not served within 30 s"));
    let stop = stream.high_watermark();
    let mut out = Vec::new();
    while stream.position() < stop {
        let batch = tokio::time::timeout(Duration::from_secs(10), stream.next_batch())
            .await
            .unwrap_or_else(|_| panic!("{topic}/{p}: no batch within 10 s"))
            .expect("read")
            .expect("stream open");
        stream.grant(batch.len() as u64).await.expect("grant");
        out.extend(batch);
    }
    out
}
