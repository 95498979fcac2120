//! A real `nats-server` (with JetStream) for the bridge tests: the binary
//! `scripts/nats-server-env` installs (`$NATS_SERVER`, else
//! `~/.cache/covet/nats/bin/nats-server`). A test without one fails with
//! a message saying how to get it; it never skips.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The nats-server binary.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/covet/nats/bin/nats-server");
    assert!(
        p.exists(),
        "no nats-server: run scripts/nats-server-env (scripts/test does) or set NATS_SERVER"
    );
    p
}

/// One nats-server process with JetStream on a loopback port, its store in
/// a directory of the test's. Restarts keep the port and the store.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts a server storing JetStream data under `dir`.
    pub fn start(dir: &Path, extra: &[&str]) -> NatsServer {
        let port = free_port();
        let mut s = NatsServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut child = Command::new(nats_server_bin())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("nats-server did not say it was ready in time");
            if line.contains("Server is ready") {
                break;
            }
        }
        self.child = Some(child);
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again, same port and store (SIGKILL first if running).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A loopback port free now (the server binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
