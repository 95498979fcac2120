//! A replica whose log is corrupt is taken out of service; the node and its
//! other groups go on (a real `covet broker` process).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{read_partition, wait_until, Broker};
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};

async fn fill(client: &Client, topic: &str, n: usize) {
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        ..Default::default()
    });
    let mut acks = Vec::new();
    for i in 0..n {
        let record = Record {
            key: None,
            value: Bytes::from(format!("{topic}-{i:0>200}")),
            headers: vec![],
            timestamp_ms: 1,
        };
        acks.push(producer.send(topic, record).await.unwrap());
        if i % 20 == 19 {
            producer.flush().await.unwrap();
        }
    }
    producer.flush().await.unwrap();
    for a in acks {
        a.await.unwrap();
    }
}

/// Group id of partition 0 of `topic`, as the node reports it.
async fn group_of(client: &Client, topic: &str) -> u64 {
    let views = client.cluster_status().await.unwrap();
    views[0]
        .groups
        .iter()
        .find(|g| g.topic == topic)
        .map(|g| g.group)
        .expect("topic's group")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_entry_takes_its_replica_out_of_service_not_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--segment-bytes", "4096"]);
    let client = Client::connect(&broker.addr).await.unwrap();
    for t in ["bad", "good"] {
        client
            .create_topic(TopicSpec::new(t).partitions(1))
            .await
            .unwrap();
        fill(&client, t, 200).await;
    }
    let bad = group_of(&client, "bad").await;
    drop(client);
    assert!(broker.terminate().success());

    // Flip a byte in the middle of the first sealed segment of `bad` (a
    // sealed segment with a valid index is not read at open), and drop the
    // applied state so that the restart replays the log through raft-rs.
    let gdir = dir.path().join("groups").join(bad.to_string());
    let mut segments: Vec<_> = std::fs::read_dir(&gdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "several segments: {segments:?}");
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&segments[0], bytes).unwrap();
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();

    broker.restart();
    let client = Client::connect(&broker.addr).await.unwrap();
    let faulted = wait_until(Duration::from_secs(20), || async {
        let views = client.cluster_status().await.unwrap_or_default();
        views
            .iter()
            .flat_map(|v| v.groups.iter())
            .any(|g| g.group == bad && g.role == "faulted" && !g.fault.is_empty())
    })
    .await;
    assert!(faulted, "cluster status reports group {bad} as faulted");

    // The other topic reads back whole and takes new records.
    let read = read_partition(&client, "good", 0, StartPosition::Earliest)
        .await
        .len();
    assert_eq!(read, 200);
    fill(&client, "good", 10).await;
}

/// When the Raft driver stops on an error it cannot isolate (here: a topic
/// whose log directory cannot be removed), the process exits with the error,
/// not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_driver_ends_the_process_with_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("stuck").partitions(1))
        .await
        .unwrap();
    let group = group_of(&client, "stuck").await;
    let gdir = dir.path().join("groups").join(group.to_string());
    // Immutable: not even root can rename it away (ext4's chattr +i).
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&gdir)
            .status()
            .expect("chattr runs")
    };
    assert!(
        chattr("+i").success(),
        "chattr +i needs an ext4-like filesystem"
    );
    let _ = client.delete_topic("stuck").await;
    let status = broker.wait_exit(Duration::from_secs(20));
    assert!(chattr("-i").success());
    let status = status.expect("the broker exits once its driver stopped");
    assert_eq!(
        status.code(),
        Some(1),
        "exit status {status}: an error, not a panic (101)"
    );
}
