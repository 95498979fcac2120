//! One `covet broker` process of a test cluster: spawning it, waiting for
//! its `ready` line, signalling it, and keeping its output in files.
//!
//! Each node has a directory holding `data/` (its `--data-dir`),
//! `stderr.log` (its log, appended across restarts with a marker line per
//! start) and `stdout.log`. The ports never change, so a restarted node is
//! reachable where it was; they are picked outside the kernel's ephemeral
//! range so nothing else takes them while a node is down.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::oneshot;

/// A node id, as given to `--node-id` (from 1).
pub type NodeId = u64;

/// How long a node may take to print `ready` (elections included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything needed to start one node again and again.
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    pub id: NodeId,
    pub dir: PathBuf,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// The `--peers` value: this node's own entry and, for every other
    /// node, the proxy on the link from this node to it.
    pub peers: String,
    pub log_level: String,
    /// More `covet broker` flags, for scenarios that need them.
    pub extra_args: Vec<String>,
}

impl NodeSpec {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn stderr_log(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }
}

/// A spawned process, possibly not ready yet.
pub(crate) struct Running {
    pub child: Child,
    ready: Option<oneshot::Receiver<()>>,
    /// Whether the test stopped it with SIGSTOP.
    pub paused: bool,
}

impl Running {
    /// Starts the broker; does not wait for it to be ready.
    pub fn spawn(bin: &Path, spec: &NodeSpec) -> anyhow::Result<Running> {
        std::fs::create_dir_all(&spec.dir)?;
        let mut stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.stderr_log())?;
        writeln!(stderr, "=== cluster-tests: starting node {} ===", spec.id)?;
        let mut child = Command::new(bin)
            .arg("broker")
            .arg("--node-id")
            .arg(spec.id.to_string())
            .arg("--data-dir")
            .arg(spec.data_dir())
            .arg("--listen")
            .arg(spec.client_addr.to_string())
            .arg("--peer-listen")
            .arg(spec.peer_addr.to_string())
            .arg("--peers")
            .arg(&spec.peers)
            .arg("--log-level")
            .arg(&spec.log_level)
            .args(&spec.extra_args)
            // Plain log files, without colour escapes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(copy_stdout(stdout, spec.dir.join("stdout.log"), tx));
        Ok(Running {
            child,
            ready: Some(rx),
            paused: false,
        })
    }

    /// Waits for the `ready` line until `deadline`; fails early if the
    /// process exits first.
    pub async fn wait_ready(
        &mut self,
        spec: &NodeSpec,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let Some(ready) = self.ready.take() else {
            return Ok(());
        };
        tokio::select! {
            r = ready => match r {
                Ok(()) => Ok(()),
                Err(_) => {
                    let status = self.child.wait().await?;
                    bail!("node {} closed stdout without `ready` ({status})\n{}",
                        spec.id, log_tail(&spec.stderr_log(), 30))
                }
            },
            status = self.child.wait() => bail!(
                "node {} exited before it was ready ({})\n{}",
                spec.id, status?, log_tail(&spec.stderr_log(), 30)
            ),
            () = tokio::time::sleep_until(deadline) => bail!(
                "node {} not ready within {READY_TIMEOUT:?}\n{}",
                spec.id, log_tail(&spec.stderr_log(), 30)
            ),
        }
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`).
    pub async fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already reaped")?;
        let status = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        if !status.success() {
            bail!("kill -s {name} {pid} failed: {status}");
        }
        Ok(())
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill9(mut self) -> anyhow::Result<ExitStatus> {
        self.child.start_kill()?;
        Ok(self.child.wait().await?)
    }

    /// SIGTERM (after SIGCONT if paused), and waits for the exit; SIGKILL
    /// if it takes longer than [`TERMINATE_TIMEOUT`].
    pub async fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        if self.paused {
            self.signal("CONT").await?;
        }
        self.signal("TERM").await?;
        match tokio::time::timeout(TERMINATE_TIMEOUT, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = self.kill9().await;
                bail!("node did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM")
            }
        }
    }

    /// The exit status if the process has ended on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// Copies the node's stdout into `stdout.log`, signalling the first line
/// that contains `ready`.
async fn copy_stdout(stdout: ChildStdout, path: PathBuf, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .ok();
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("ready") {
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
        }
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

/// The last `lines` lines of a log file, for failure reports.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Picks `n` distinct free loopback ports for nodes to bind, below the
/// kernel's ephemeral range: a port from that range could be taken by any
/// outgoing connection (the proxies reconnect often) while its node is
/// down, and the node could not bind it again on restart. All `n` are bound
/// at once, then released, so they differ from each other.
pub(crate) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let (low, high) = fixed_port_range();
    let span = u32::from(high - low);
    // No need for good randomness: spread concurrent test processes apart.
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let mut held = Vec::new();
    for i in 0..span {
        if held.len() == n {
            break;
        }
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!("found only {} free ports in {low}..{high}", held.len());
    }
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Ports the kernel never hands out on its own: from 10000 up to the start
/// of `net.ipv4.ip_local_port_range` (32768 by default).
fn fixed_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12_000 {
        (10_000, ephemeral_low)
    } else {
        (ephemeral_low.saturating_sub(2_000).max(1024), ephemeral_low)
    }
}

/// Removes a directory tree if it exists.
pub(crate) fn remove_dir(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}
