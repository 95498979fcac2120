//! A real `nats-server` (with JetStream) for the bridge tests: the binary
//! `scripts/nats-server-env` installs (`$NATS_SERVER`, else
//! `~/.cache/covet/nats/bin/nats-server`). A test without one fails with
//! a message saying how to get it; it never skips.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;

use super::process::{self, spawn_until_ready, Output};

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
        let mut command = Command::new(nats_server_bin());
        command
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
            .stdout(Stdio::null());
        let started = spawn_until_ready(
            &mut command,
            Output::Stderr,
            "Server is ready",
            Duration::from_secs(30),
            "nats-server",
            String::new,
        );
        self.child = Some(started.child);
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        process::kill9(&mut self.child);
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

/// One message the bridge published, as the tests look at it: where
/// its record was (`covet-topic`, `covet-partition`, `covet-offset`) and
/// what it carries.
#[derive(Debug, Clone)]
pub struct Seen {
    pub subject: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<String>,
    pub value: Bytes,
    pub headers: async_nats::HeaderMap,
}

impl Seen {
    pub fn of(subject: &str, headers: Option<&async_nats::HeaderMap>, value: Bytes) -> Seen {
        let h = headers.expect("a bridged message has headers");
        let get = |n: &str| {
            h.get(n)
                .unwrap_or_else(|| panic!("no {n} header on {subject}"))
                .as_str()
                .to_string()
        };
        Seen {
            subject: subject.to_string(),
            topic: get("covet-topic"),
            partition: get("covet-partition").parse().expect("partition"),
            offset: get("covet-offset").parse().expect("offset"),
            key: h.get("covet-key").map(|v| v.as_str().to_string()),
            value,
            headers: h.clone(),
        }
    }

    pub fn id(&self) -> (String, u32, u64) {
        (self.topic.clone(), self.partition, self.offset)
    }
}

/// Reads a stream from the start, a step at a time, through restarts of
/// the server: each [`StreamReader::poll`] reads what was stored since the
/// last one, with a fresh ordered consumer from the next sequence.
pub struct StreamReader {
    js: jetstream::Context,
    stream: String,
    next: u64,
    pub seen: Vec<Seen>,
}

impl StreamReader {
    pub fn new(js: &jetstream::Context, stream: &str) -> StreamReader {
        StreamReader {
            js: js.clone(),
            stream: stream.to_string(),
            next: 1,
            seen: Vec::new(),
        }
    }

    /// Reads up to the stream's last sequence now. Failures (a server
    /// restarting) leave what was read so far; the next poll goes on.
    pub async fn poll(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.poll_inner()).await;
    }

    async fn poll_inner(&mut self) -> Option<()> {
        let mut stream = self.js.get_stream(&self.stream).await.ok()?;
        let last = stream.info().await.ok()?.state.last_sequence;
        if last < self.next {
            return Some(());
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.next,
                },
                ..Default::default()
            })
            .await
            .ok()?;
        let mut messages = consumer.messages().await.ok()?;
        while self.next <= last {
            let m = messages.next().await?.ok()?;
            let seq = m.info().ok()?.stream_sequence;
            self.seen.push(Seen::of(
                m.subject.as_str(),
                m.headers.as_ref(),
                m.payload.clone(),
            ));
            self.next = seq + 1;
        }
        Some(())
    }

    pub fn unique(&self) -> usize {
        self.seen.iter().map(Seen::id).collect::<HashSet<_>>().len()
    }

    /// Polls until `want` distinct records were read or `timeout` passes.
    pub async fn wait_unique(&mut self, want: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll().await;
            if self.unique() >= want {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages read more than once (by record).
    pub fn duplicates(&self) -> usize {
        self.seen.len() - self.unique()
    }
}
