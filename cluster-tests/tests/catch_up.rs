//! A follower that missed more than the retained log is brought back by a
//! snapshot, then the entries after it.
//!
//! It must never replay the log from offset 0: both live replicas trimmed
//! those entries before it came back, so the only way it could is from
//! messages its leader queued for it while it was dead and delivered when
//! it returned. That happened (about one run in ten, more often when the
//! leader's redial backoff is long): the transport kept queueing appends
//! during its backoff and sent them, stale, on the next successful dial.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};
use covet_cluster_tests::cluster::Cluster;

const TOPIC: &str = "trimmed";
const RECORDS: u64 = 2000;
const TIMEOUT: Duration = Duration::from_secs(30);

async fn replica_end(client: &Client, node: u64) -> Option<(u64, u64)> {
    let s = client
        .open_replica(node, TOPIC, 0, StartPosition::Earliest, 0)
        .await
        .ok()?;
    Some((s.start_offset(), s.high_watermark()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_the_retained_log_catches_up_from_a_snapshot() {
    let mut cluster = Cluster::start_with(
        3,
        &["--segment-bytes", "65536", "--retention-check-ms", "50"],
    )
    .await
    .unwrap();
    let client = Client::connect(&cluster.client_addrs()).await.unwrap();
    let mut spec = TopicSpec::new(TOPIC).partitions(1);
    spec.replication_factor = 3;
    spec.retention_bytes = Some(256 * 1024);
    client.create_topic(spec).await.unwrap();
    let leader = cluster
        .wait_leader(TOPIC, 0, TIMEOUT, |_| true)
        .await
        .unwrap();
    let follower = cluster
        .node_ids()
        .into_iter()
        .find(|&n| n != leader)
        .unwrap();
    let before = cluster.link(leader, follower).unwrap().accepted();
    cluster.kill9(follower).await.unwrap();
    // Let the leader redial the dead follower a few times, so its backoff is
    // long: the window in which a transport that queues for a dead peer
    // would pile up the appends produced below.
    covet_cluster_tests::wait_until(TIMEOUT, || async {
        let dials = cluster.link(leader, follower).map_or(0, |l| l.accepted());
        (dials >= before + 5).then_some(())
    })
    .await
    .expect("the leader redials the dead follower");

    // ~2 MB through a 256 KiB retention while the follower is away.
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        max_batch_bytes: 16 * 1024,
        ..ProducerConfig::default()
    });
    let mut deliveries = Vec::new();
    for i in 0..RECORDS {
        let value = Bytes::from(format!("{i:06}:{}", "v".repeat(1000)));
        let record = Record {
            value,
            ..Record::default()
        };
        deliveries.push(producer.send_to(TOPIC, 0, record).await.unwrap());
    }
    producer.flush().await.unwrap();
    for d in deliveries {
        d.await.unwrap();
    }
    // Retention runs on every replica on its own schedule: wait until both
    // live replicas have trimmed, so whichever leads must send a snapshot.
    let live: Vec<u64> = cluster
        .node_ids()
        .into_iter()
        .filter(|&n| n != follower)
        .collect();
    for &node in &live {
        covet_cluster_tests::wait_until(TIMEOUT, || async {
            replica_end(&client, node)
                .await
                .filter(|(start, _)| *start > 0)
        })
        .await
        .expect("every live replica trimmed its log");
    }

    cluster.restart(follower).await.unwrap();
    // Every state it passes through on the way, as fast as it can be asked.
    let seen: RefCell<Vec<(u64, u64)>> = RefCell::default();
    let (start, end) = covet_cluster_tests::wait_until(TIMEOUT, || async {
        let now = replica_end(&client, follower).await?;
        let mut seen = seen.borrow_mut();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        Some(now).filter(|(_, end)| *end == RECORDS)
    })
    .await
    .expect("the follower caught up");
    let seen = seen.into_inner();
    println!("follower {follower} went through (start, end) {seen:?}");
    // A replay from offset 0 shows as records held from start 0.
    assert!(
        seen.iter().all(|&(start, end)| end == 0 || start > 0),
        "follower {follower} replayed the trimmed log from offset 0 instead of \
         installing a snapshot: (start, end) went {seen:?}"
    );
    assert!(
        start > 0,
        "follower {follower} caught up with start offset 0"
    );
    let mut stream = client
        .open_replica(follower, TOPIC, 0, StartPosition::Earliest, 10_000)
        .await
        .unwrap();
    // The replica trims its own log on its own schedule, so it may start
    // later now than when it was first asked: read from where it starts.
    let mut next = stream.position();
    assert!(
        next >= start && next < end,
        "replica starts at {next}, ends at {end}"
    );
    while next < end {
        let batch = stream.next_batch().await.unwrap().unwrap();
        stream.grant(batch.len() as u64).await.unwrap();
        for r in batch {
            assert_eq!(r.offset, next);
            assert!(r.value.starts_with(format!("{next:06}:").as_bytes()));
            next += 1;
        }
    }
    // And it keeps up with new writes like any replica.
    producer
        .send_to(
            TOPIC,
            0,
            Record {
                value: Bytes::from_static(b"after"),
                ..Record::default()
            },
        )
        .await
        .unwrap()
        .await
        .unwrap();
    covet_cluster_tests::wait_until(TIMEOUT, || async {
        replica_end(&client, follower)
            .await
            .filter(|(_, end)| *end == RECORDS + 1)
    })
    .await
    .expect("the follower follows new writes");
}
