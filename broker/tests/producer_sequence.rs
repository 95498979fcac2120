//! The idempotent producer's sequence rules against a real `covet broker`
//! process (issue 6): a batch refused for good must not drag healthy
//! batches behind it down with it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Broker;
use covet_client::{Client, ProducerConfig, Reason, Record, StartPosition, TopicSpec};

fn record(value: String) -> Record {
    Record {
        key: None,
        value: Bytes::from(value),
        headers: vec![],
        timestamp_ms: 1,
    }
}

/// Everything partition 0 of `topic` holds, as (offset, value).
async fn read_all(client: &Client, topic: &str) -> Vec<(u64, String)> {
    let mut stream = client
        .open_partition(topic, 0, StartPosition::Earliest, 10_000)
        .await
        .expect("open partition");
    let stop = stream.high_watermark();
    let mut out = Vec::new();
    while stream.position() < stop {
        let batch = stream
            .next_batch()
            .await
            .expect("read")
            .expect("stream open");
        stream.grant(batch.len() as u64).await.expect("grant");
        out.extend(
            batch
                .into_iter()
                .map(|r| (r.offset, String::from_utf8(r.value.to_vec()).unwrap())),
        );
    }
    out
}

/// A batch the broker refuses for good (larger than the topic allows) while
/// the batches behind it are in flight or queued: the producer moves the
/// partition to a new epoch once those in flight are back, and every one of
/// them is stored once, in the order sent. Before the fix, batches queued
/// behind the refused one were sent in the new epoch while earlier ones
/// were still in flight in the old one, skipped over them, and left them
/// failing with OUT_OF_ORDER_SEQUENCE after the retry deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_for_good_does_not_fail_the_batches_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    let mut spec = TopicSpec::new("seq").partitions(1);
    spec.max_batch_bytes = Some(1024);
    client.create_topic(spec).await.unwrap();
    // No linger: each record is its own batch; two in flight, the rest
    // queued behind them.
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        max_in_flight: 2,
        ..ProducerConfig::default()
    });

    let mut healthy = Vec::new();
    for round in 0..3 {
        for i in 0..2 {
            let v = format!("r{round}-before-{i}");
            healthy.push((
                v.clone(),
                producer.send_to("seq", 0, record(v)).await.unwrap(),
            ));
        }
        let too_large = producer
            .send_to("seq", 0, record("x".repeat(2000)))
            .await
            .unwrap();
        for i in 0..20 {
            let v = format!("r{round}-after-{i}");
            healthy.push((
                v.clone(),
                producer.send_to("seq", 0, record(v)).await.unwrap(),
            ));
        }
        let refused = tokio::time::timeout(Duration::from_secs(60), too_large)
            .await
            .expect("the large batch is answered");
        assert_eq!(
            refused.unwrap_err().reason(),
            Some(Reason::BatchTooLarge),
            "round {round}"
        );
    }

    let mut acked = Vec::new();
    for (value, delivery) in healthy {
        let outcome = tokio::time::timeout(Duration::from_secs(60), delivery)
            .await
            .unwrap_or_else(|_| panic!("{value} is answered within 60 s"));
        match outcome {
            Ok(meta) => acked.push((meta.offset, value)),
            Err(e) => panic!("{value} failed: {e}"),
        }
    }
    // Acknowledged in the order sent, at consecutive offsets, and the log
    // holds exactly those records.
    let offsets: Vec<u64> = acked.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..acked.len() as u64).collect::<Vec<_>>());
    assert_eq!(read_all(&client, "seq").await, acked);
}
