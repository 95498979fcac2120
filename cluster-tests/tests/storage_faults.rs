//! A follower whose log is corrupt is rebuilt from its peers, on a real
//! 3-node cluster: its other groups keep serving, it never votes with the
//! empty log it restarts from, and it ends with the same records as the
//! others.

use std::time::Duration;

use bytes::Bytes;
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};
use covet_cluster_tests::{wait_until, Cluster};

const TOPIC: &str = "fragile";
const RECORDS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_corrupt_log_is_rebuilt_from_its_peers() {
    let mut cluster = Cluster::start_with(3, &["--segment-bytes", "4096"])
        .await
        .expect("cluster");
    let client = Client::connect(&cluster.client_addrs())
        .await
        .expect("client");
    client
        .create_topic(TopicSpec {
            replication_factor: 3,
            ..TopicSpec::new(TOPIC).partitions(1)
        })
        .await
        .expect("create topic");
    cluster
        .wait_leader(TOPIC, 0, Duration::from_secs(20), |_| true)
        .await
        .expect("leader");
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        ..Default::default()
    });
    let mut acks = Vec::new();
    for i in 0..RECORDS {
        let record = Record {
            key: None,
            value: Bytes::from(format!("{i:0>200}")),
            headers: vec![],
            timestamp_ms: 1,
        };
        acks.push(producer.send(TOPIC, record).await.expect("send"));
        if i % 25 == 24 {
            producer.flush().await.expect("flush");
        }
    }
    producer.flush().await.expect("flush");
    for a in acks {
        a.await.expect("acked");
    }
    let leader = cluster
        .wait_leader(TOPIC, 0, Duration::from_secs(10), |_| true)
        .await
        .expect("leader");
    let victim = cluster
        .node_ids()
        .into_iter()
        .find(|&n| n != leader)
        .expect("a follower");
    let group = client
        .cluster_status()
        .await
        .expect("status")
        .iter()
        .flat_map(|v| v.groups.iter())
        .find(|g| g.topic == TOPIC)
        .map(|g| g.group)
        .expect("group of the topic");

    // Wait until the victim holds everything, then stop it cleanly and
    // damage a sealed segment (not read at open) and drop its applied state,
    // so the restart replays the log through raft-rs and meets the damage.
    wait_until(Duration::from_secs(20), || async {
        let views = client.cluster_status().await.ok()?;
        views
            .iter()
            .flat_map(|v| v.groups.iter())
            .find(|g| g.group == group && g.role == "leader")
            .filter(|g| g.replicas.iter().any(|r| r.node == victim && r.lag == 0))
            .map(|_| ())
    })
    .await
    .expect("victim caught up before the damage");
    cluster.terminate(victim).await.expect("stop victim");
    let data = cluster.data_dir(victim).expect("data dir");
    let gdir = data.join("groups").join(group.to_string());
    let mut segments: Vec<_> = std::fs::read_dir(&gdir)
        .expect("group dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "several segments: {segments:?}");
    let mut bytes = std::fs::read(&segments[0]).expect("segment");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&segments[0], bytes).expect("damage");
    std::fs::remove_dir_all(data.join("state")).expect("drop applied state");
    cluster.restart(victim).await.expect("restart victim");

    // The replica is rebuilt and catches up; everything it serves matches.
    let caught_up = wait_until(Duration::from_secs(30), || async {
        let views = client.cluster_status().await.ok()?;
        views
            .iter()
            .flat_map(|v| v.groups.iter())
            .find(|g| g.group == group && g.role == "leader")
            .filter(|g| {
                g.replicas
                    .iter()
                    .any(|r| r.node == victim && r.lag == 0 && r.matched > 0)
            })
            .map(|_| ())
    })
    .await;
    if let Err(e) = caught_up {
        cluster.dump_logs(60);
        panic!("the rebuilt replica did not catch up: {e:#}");
    }
    let log = cluster.log_tail(victim, 400);
    assert!(
        log.contains("replica out of service"),
        "the fault was reported:\n{log}"
    );
    assert!(
        log.contains("rebuilding the replica"),
        "the replica was rebuilt:\n{log}"
    );
    let mut stream = client
        .open_replica(victim, TOPIC, 0, StartPosition::Earliest, 5000)
        .await
        .expect("read the rebuilt replica");
    let mut seen = 0u64;
    while seen < RECORDS {
        let batch = tokio::time::timeout(Duration::from_secs(10), stream.next_batch())
            .await
            .expect("read in time")
            .expect("read")
            .expect("stream open");
        for r in &batch {
            assert_eq!(r.offset, seen, "contiguous offsets");
            assert_eq!(r.value, Bytes::from(format!("{seen:0>200}")));
            seen += 1;
        }
        stream.grant(batch.len() as u64).await.expect("grant");
    }
}
