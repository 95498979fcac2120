//! A broker under a low open-file limit: more partitions than it may hold
//! files open must still be created, written, and recovered after a
//! `kill -9`. Each partition is a Raft group with its own log; before
//! segment files went through a bounded cache every group held its active
//! segment open, so creating 300 partitions at a limit of 128 ran the
//! broker out of descriptors: every group past the first hundred or so
//! failed with `EMFILE` and went out of service, its partition leaderless
//! (and at a limit of 1,024 an earlier broker died, and died again on
//! every restart on that data dir).
//!
//! Its own test binary: it lowers this process's own limit (soft and hard,
//! so the broker cannot raise it), which the brokers it starts inherit.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{read_partition, wait_until, Broker};
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};
use futures::StreamExt;

/// The open-file limit (soft = hard) the brokers run under.
const FD_LIMIT: u64 = 128;
/// More partitions than the limit allows files open at once.
const PARTITIONS: u32 = 300;

/// Lowers this process's `RLIMIT_NOFILE`, soft and hard, to `limit`.
fn limit_open_files(limit: u64) {
    let lim = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: setrlimit only reads the struct, which outlives the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn record(partition: u32) -> Record {
    Record {
        key: None,
        value: Bytes::from(format!("partition-{partition}")),
        headers: vec![],
        timestamp_ms: 0,
    }
}

/// Every record of partition `p` up to its high watermark.
async fn read_all(client: &Client, topic: &str, p: u32) -> Vec<(u64, Bytes)> {
    read_partition(client, topic, p, StartPosition::Earliest)
        .await
        .into_iter()
        .map(|r| (r.offset, r.value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_partitions_under_a_low_fd_limit_survive_kill_9() {
    limit_open_files(FD_LIMIT);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.expect("connect");
    client
        .create_topic(TopicSpec::new("wide").partitions(PARTITIONS))
        .await
        .expect("create a topic with more partitions than open files");

    let producer = client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for p in 0..PARTITIONS {
        let d = producer.send_to("wide", p, record(p)).await.expect("send");
        deliveries.push((p, d));
    }
    producer.flush().await.expect("flush");
    let mut acked: HashMap<u32, u64> = HashMap::new();
    for (p, d) in deliveries {
        let meta = tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .unwrap_or_else(|_| panic!("partition {p}: no acknowledgement in 30 s"))
            .unwrap_or_else(|e| panic!("partition {p}: {e}"));
        assert_eq!(meta.partition, p);
        acked.insert(p, meta.offset);
    }
    drop(producer);
    drop(client);

    broker.restart();
    let client = Client::connect(&broker.addr).await.expect("reconnect");
    // Partitions elect their leaders again after the restart.
    let ready = wait_until(Duration::from_secs(30), || async {
        client.describe_topic("wide").await.is_ok()
    })
    .await;
    assert!(ready, "topic not served after the restart");
    // Read back 16 partitions at a time: each read is a stream of its own.
    let checks = futures::stream::iter(0..PARTITIONS).map(|p| {
        let (client, offset) = (client.clone(), acked[&p]);
        async move {
            let records = read_all(&client, "wide", p).await;
            let expected = format!("partition-{p}");
            assert!(
                records.iter().any(|(o, v)| *o == offset && *v == expected),
                "partition {p}: acknowledged record at offset {offset} missing after restart: {records:?}"
            );
        }
    });
    checks.buffer_unordered(16).collect::<Vec<()>>().await;
}
