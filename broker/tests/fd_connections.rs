//! A flood of idle connections never takes the descriptors storage needs:
//! connections beyond the broker's limit are refused (accepted and closed),
//! and a well-behaved client keeps producing through segment rolls, with
//! every acknowledged record there after a `kill -9` and restart.
//!
//! The broker runs under an open-file limit of 128 (soft and hard, set in
//! the child before `exec`, so it cannot raise it); this test process keeps
//! its own, higher limit to open the flood.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};

const FD_LIMIT: libc::rlim_t = 128;
/// Far more idle connections than the broker may hold descriptors.
const FLOOD: usize = 400;

/// A `covet broker` under the descriptor limit, killed on drop.
struct LimitedBroker {
    child: Child,
    addr: String,
}

impl LimitedBroker {
    fn start(dir: &Path) -> LimitedBroker {
        let mut command = Command::new(env!("CARGO_BIN_EXE_covet"));
        command
            .arg("broker")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            // Small segments: producing rolls them, and every roll opens
            // files (the new segment, its index, the directory).
            .args(["--segment-bytes", "4096"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: runs in the child between fork and exec, and only calls
        // setrlimit, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: FD_LIMIT,
                    rlim_max: FD_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("spawn covet broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("no ready line in time");
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split(',').next().expect("address").to_string();
            }
        };
        LimitedBroker { child, addr }
    }
}

impl Drop for LimitedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn record(i: u32) -> Record {
    Record {
        key: None,
        value: Bytes::from(format!("record-{i:05}-{}", "x".repeat(200))),
        headers: vec![],
        timestamp_ms: 0,
    }
}

/// Produces `count` records from `from` on to partition 0 and returns their
/// offsets, failing the test on any error.
async fn produce(client: &Client, from: u32, count: u32) -> Vec<(u32, u64)> {
    let producer = client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in from..from + count {
        let d = producer.send_to("t", 0, record(i)).await.expect("send");
        deliveries.push((i, d));
    }
    producer.flush().await.expect("flush");
    let mut acked = Vec::new();
    for (i, d) in deliveries {
        let meta = tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .unwrap_or_else(|_| panic!("record {i}: no acknowledgement in 30 s"))
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        acked.push((i, meta.offset));
    }
    acked
}

/// Whether the broker closed this connection (EOF or reset), rather than
/// holding it open (a read times out).
fn is_closed(mut s: &TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("set timeout");
    let mut buf = [0u8; 1];
    match std::io::Read::read(&mut s, &mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_limit_are_refused_and_writes_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = LimitedBroker::start(dir.path());
    let client = Client::connect(&broker.addr).await.expect("connect");
    client
        .create_topic(TopicSpec::new("t").partitions(1))
        .await
        .expect("create topic");
    let mut acked = produce(&client, 0, 100).await;

    // The flood: idle TCP connections that never speak. The broker must
    // refuse those beyond its limit rather than run out of descriptors.
    let addr: std::net::SocketAddr = broker.addr.parse().expect("broker address");
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        // A listener that stopped accepting fills its backlog, and then
        // connecting hangs: bounded here.
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => flood.push(s),
            Err(e) => panic!("the listener stopped accepting: {e}"),
        }
    }
    // Many segment rolls while the flood is held open.
    acked.extend(produce(&client, 100, 400).await);

    // The refused connections were closed by the broker: reading one
    // ends (EOF or reset) instead of timing out.
    let closed = flood.iter().filter(|s| is_closed(s)).count();
    assert!(
        closed >= FLOOD / 2,
        "only {closed} of {FLOOD} flood connections were refused"
    );
    drop(flood);
    drop(client);

    // Restart on the same data dir under the same limit: every
    // acknowledged record is there.
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    drop(broker);
    broker = LimitedBroker::start(dir.path());
    let client = Client::connect(&broker.addr).await.expect("reconnect");
    let mut stream = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream.is_none() {
        match client
            .open_partition("t", 0, StartPosition::Earliest, 5_000)
            .await
        {
            Ok(s) => stream = Some(s),
            // Not served yet: the partition elects its leader again.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("partition not served after restart: {e}"),
        }
    }
    let mut stream = stream.expect("stream");
    let stop = stream.high_watermark();
    let mut read = std::collections::HashMap::new();
    while stream.position() < stop {
        let batch = tokio::time::timeout(Duration::from_secs(10), stream.next_batch())
            .await
            .expect("batch in time")
            .expect("read")
            .expect("stream open");
        stream.grant(batch.len() as u64).await.expect("grant");
        for r in batch {
            read.insert(r.offset, r.value);
        }
    }
    for (i, offset) in acked {
        assert_eq!(
            read.get(&offset),
            Some(&record(i).value),
            "record {i} acknowledged at offset {offset} is missing"
        );
    }
}
