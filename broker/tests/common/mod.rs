//! Test support: real `covet broker` processes in temp dirs.
//!
//! A broker is started on an ephemeral loopback port; readiness is the
//! `ready` line it prints, awaited with a deadline (never a sleep). Children
//! are killed when their handle drops.

#![allow(dead_code)]

pub mod bridge;
pub mod nats;
pub mod process;
pub mod raw;

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
        Broker::launch(dir, extra, None)
    }

    /// Like [`Broker::start`], with soft and hard open-file limits of
    /// `limit` (restarts keep it), so the broker cannot raise them.
    pub fn start_with_fd_limit(dir: &Path, extra: &[&str], limit: u64) -> Broker {
        Broker::launch(dir, extra, Some(limit))
    }

    fn launch(dir: &Path, extra: &[&str], fd_limit: Option<u64>) -> Broker {
        let mut b = Broker {
            child: None,
            addr: String::new(),
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            lines: None,
            fd_limit,
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
        command
            .arg("broker")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.listen, "--log-level", "warn"])
            .args(&self.extra)
            .stderr(Stdio::inherit());
        let started = process::spawn_until_ready(
            &mut command,
            process::Output::Stdout,
            "ready",
            READY_TIMEOUT,
            "covet broker",
            String::new,
        );
        let addr = started
            .ready_line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .expect("ready line names the address");
        self.addr = addr.to_string();
        self.child = Some(started.child);
        self.lines = Some(started.lines);
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        process::kill9(&mut self.child);
    }

    /// SIGTERM, and the exit status (within 60 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        process::sigterm(self.child.as_ref().expect("broker running"));
        process::wait_exit(&mut self.child, Duration::from_secs(60))
            .expect("the broker did not exit within 60 s of SIGTERM")
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
        process::wait_exit(&mut self.child, timeout)
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
