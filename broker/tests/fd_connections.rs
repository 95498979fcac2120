//! A flood of idle connections never takes the descriptors storage needs:
//! connections beyond the broker's limit are refused (accepted and closed),
//! and a well-behaved client keeps producing through segment rolls, with
//! every acknowledged record there after a `kill -9` and restart.
//!
//! The broker runs under an open-file limit of 128 (soft and hard, set in
//! the child before `exec`, so it cannot raise it); this test process keeps
//! its own, higher limit to open the flood.

mod common;

use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::{read_partition, Broker};
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};

const FD_LIMIT: u64 = 128;
/// Small segments: producing rolls them, and every roll opens files (the
/// new segment, its index, the directory).
const SMALL_SEGMENTS: [&str; 2] = ["--segment-bytes", "4096"];
/// Far more idle connections than the broker may hold descriptors.
const FLOOD: usize = 400;

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
    let mut broker = Broker::start_with_fd_limit(dir.path(), &SMALL_SEGMENTS, FD_LIMIT);
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
    broker.restart();
    let client = Client::connect(&broker.addr).await.expect("reconnect");
    let read: std::collections::HashMap<u64, Bytes> =
        read_partition(&client, "t", 0, StartPosition::Earliest)
            .await
            .into_iter()
            .map(|r| (r.offset, r.value))
            .collect();
    for (i, offset) in acked {
        assert_eq!(
            read.get(&offset),
            Some(&record(i).value),
            "record {i} acknowledged at offset {offset} is missing"
        );
    }
}
