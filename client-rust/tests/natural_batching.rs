//! Natural batching, against a real `covet broker` process: a batch is
//! closed when its partition has a free in-flight slot and it is due (at
//! once with linger 0), when it is full, or on `flush`; records that arrive
//! while the window is full keep filling the open batch.
//!
//! The window is held full by stopping the broker (SIGSTOP) after one batch
//! has gone out: nothing can be answered until it is continued, so how the
//! producer batches what it is given meanwhile is deterministic.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{wait_until, Broker};
use covet_client::{Client, Delivery, Producer, ProducerConfig, Record, TopicSpec};
use futures::FutureExt;

const TOPIC: &str = "nb";
/// Bounds every wait for acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

fn record(i: usize) -> Record {
    Record {
        value: Bytes::from(format!("record-{i:06}")),
        ..Default::default()
    }
}

/// A broker with the test topic (one partition) and a producer whose id is
/// fetched and whose first batch is acknowledged; returns the offset the
/// next record will get.
async fn warm(config: ProducerConfig) -> (Broker, Client, Producer, u64) {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.expect("connect");
    client
        .create_topic(TopicSpec::new(TOPIC).partitions(1))
        .await
        .expect("create topic");
    let producer = client.producer(config);
    let first = producer.send_to(TOPIC, 0, record(0)).await.expect("send");
    // Flush, so that a long linger does not hold the warm-up record.
    tokio::time::timeout(ACK_TIMEOUT, producer.flush())
        .await
        .expect("warm-up flushed in time")
        .expect("warm-up flushed");
    let first = tokio::time::timeout(ACK_TIMEOUT, first)
        .await
        .expect("warm-up acknowledged in time")
        .expect("warm-up acknowledged");
    (broker, client, producer, first.offset + 1)
}

/// Awaits every delivery and checks the records got consecutive offsets
/// from `next`, in send order.
async fn assert_in_order(deliveries: Vec<Delivery>, next: u64) {
    let all = tokio::time::timeout(ACK_TIMEOUT, futures::future::join_all(deliveries))
        .await
        .expect("all records acknowledged in time");
    for (i, d) in all.into_iter().enumerate() {
        let meta = d.unwrap_or_else(|e| panic!("record {i} failed: {e}"));
        assert_eq!(meta.partition, 0);
        assert_eq!(meta.offset, next + i as u64, "record {i} out of order");
    }
}

/// Linger 0 and one batch in flight: the first record after the broker
/// stops goes out at once (the slot is free) and holds the window; the
/// other 999 wait in one open batch, which goes out as soon as the first is
/// answered. Before natural batching each of them was a batch of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linger_zero_a_full_window_turns_into_few_batches() {
    let (mut broker, _client, producer, next) = warm(ProducerConfig {
        linger: Duration::ZERO,
        max_in_flight: 1,
        ..ProducerConfig::default()
    })
    .await;
    let before = producer.stats();
    broker.pause();
    let mut deliveries = Vec::new();
    for i in 0..1000 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    broker.resume();
    assert_in_order(deliveries, next).await;
    let after = producer.stats();
    assert_eq!(after.records - before.records, 1000);
    let batches = after.batches - before.batches;
    assert!(batches <= 3, "1000 records went in {batches} batches");
}

/// Linger > 0 under a full window: a batch whose linger has passed stays
/// open while the partition has no free slot, and keeps filling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linger_deadline_under_a_full_window_keeps_filling() {
    let linger = Duration::from_millis(20);
    let (mut broker, _client, producer, next) = warm(ProducerConfig {
        linger,
        max_in_flight: 1,
        ..ProducerConfig::default()
    })
    .await;
    let before = producer.stats();
    broker.pause();
    let mut deliveries = Vec::new();
    deliveries.push(producer.send_to(TOPIC, 0, record(0)).await.expect("send"));
    // The first record's batch closes at its deadline: the slot is free.
    assert!(
        wait_until(ACK_TIMEOUT, || producer.stats().batches > before.batches).await,
        "the first batch closes at its linger deadline"
    );
    // Five rounds, each longer than the linger: every round's records are
    // due before the next round starts, but the window stays full.
    for round in 0..5 {
        let started = tokio::time::Instant::now();
        for i in 0..200 {
            let r = record(1 + round * 200 + i);
            deliveries.push(producer.send_to(TOPIC, 0, r).await.expect("send"));
        }
        tokio::time::sleep_until(started + linger * 3).await;
    }
    let held = producer.stats().batches - before.batches;
    broker.resume();
    assert_in_order(deliveries, next).await;
    let after = producer.stats();
    assert_eq!(after.records - before.records, 1001);
    let batches = after.batches - before.batches;
    assert_eq!(held, 1, "nothing more closes while the window is full");
    assert!(batches <= 3, "1001 records went in {batches} batches");
}

/// A batch that reaches `max_batch_bytes` closes (and queues) even when the
/// window is full, so batches stay within the size limit; order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_batches_close_under_a_full_window() {
    let (mut broker, _client, producer, next) = warm(ProducerConfig {
        linger: Duration::ZERO,
        max_in_flight: 1,
        max_batch_bytes: 4096,
        ..ProducerConfig::default()
    })
    .await;
    let before = producer.stats();
    broker.pause();
    let mut deliveries = Vec::new();
    for i in 0..1000 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    // About 20 bytes a record: some 200 a batch, so at least 4 full
    // batches are closed while the broker is stopped.
    let held = producer.stats().batches - before.batches;
    broker.resume();
    assert_in_order(deliveries, next).await;
    let batches = producer.stats().batches - before.batches;
    assert!(held >= 4, "full batches close at once ({held} closed)");
    assert!(
        batches <= 1000 * 40 / 4096 + 3,
        "1000 records went in {batches} batches"
    );
}

/// `flush` closes the open batches, due or not, slot or not, and returns
/// once everything sent before it is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_closes_everything() {
    let (mut broker, _client, producer, next) = warm(ProducerConfig {
        linger: Duration::from_secs(600),
        max_in_flight: 1,
        ..ProducerConfig::default()
    })
    .await;
    let before = producer.stats();
    let mut deliveries = Vec::new();
    for i in 0..10 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    tokio::time::timeout(ACK_TIMEOUT, producer.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_eq!(producer.stats().batches - before.batches, 1);
    assert_in_order(deliveries, next).await;

    // Again with the window full: the flushed batch queues behind the one
    // in flight.
    let next = next + 10;
    broker.pause();
    let mut deliveries = Vec::new();
    for i in 0..10 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    let flusher = producer.clone();
    let flush = tokio::spawn(async move { flusher.flush().await });
    assert!(
        wait_until(ACK_TIMEOUT, || producer.stats().batches - before.batches
            == 2)
        .await,
        "flush closes the open batch"
    );
    for i in 10..20 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    broker.resume();
    tokio::time::timeout(ACK_TIMEOUT, flush)
        .await
        .expect("flush in time")
        .expect("flush task")
        .expect("flush");
    // What came after the flush is not covered by it: flush again.
    tokio::time::timeout(ACK_TIMEOUT, producer.flush())
        .await
        .expect("second flush in time")
        .expect("second flush");
    assert_in_order(deliveries, next).await;
}

/// At low load a record goes out at once: with linger 0, one record sent to
/// an idle partition is its own batch and is acknowledged without waiting
/// for anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_record_goes_out_at_once() {
    let (_broker, _client, producer, next) = warm(ProducerConfig {
        linger: Duration::ZERO,
        max_in_flight: 1,
        ..ProducerConfig::default()
    })
    .await;
    let before = producer.stats();
    let d = producer.send_to(TOPIC, 0, record(1)).await.expect("send");
    assert_eq!(
        producer.stats().batches - before.batches,
        1,
        "closed at once"
    );
    let meta = tokio::time::timeout(Duration::from_secs(10), d)
        .await
        .expect("acknowledged without waiting")
        .expect("acknowledged");
    assert_eq!(meta.offset, next);
    assert_eq!(producer.stats().records - before.records, 1);
}

/// On a warmed producer `send` appends and returns without yielding to the
/// runtime: no task hand-off on the per-record path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_does_not_yield() {
    let (_broker, _client, producer, next) = warm(ProducerConfig {
        linger: Duration::from_secs(600),
        ..ProducerConfig::default()
    })
    .await;
    let mut deliveries = Vec::new();
    for i in 0..100 {
        let d = producer
            .send_to(TOPIC, 0, record(i))
            .now_or_never()
            .expect("send completes without yielding")
            .expect("send");
        deliveries.push(d);
    }
    tokio::time::timeout(ACK_TIMEOUT, producer.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_in_order(deliveries, next).await;
}

/// Dropping the last handle sends what is still open, as `flush` would:
/// no delivery is left waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_producer_sends_open_batches() {
    let (_broker, _client, producer, next) = warm(ProducerConfig {
        linger: Duration::from_secs(600),
        ..ProducerConfig::default()
    })
    .await;
    let mut deliveries = Vec::new();
    for i in 0..10 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    drop(producer);
    assert_in_order(deliveries, next).await;
}

/// Records for two topics, interleaved, each keep their own batches and
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_topics_interleaved() {
    let (_broker, client, producer, next) = warm(ProducerConfig {
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    })
    .await;
    client
        .create_topic(TopicSpec::new("other").partitions(1))
        .await
        .expect("create topic");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..200 {
        ours.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
        theirs.push(producer.send_to("other", 0, record(i)).await.expect("send"));
    }
    assert_in_order(ours, next).await;
    let theirs = tokio::time::timeout(ACK_TIMEOUT, futures::future::join_all(theirs))
        .await
        .expect("acknowledged in time");
    for (i, d) in theirs.into_iter().enumerate() {
        let meta = d.expect("acknowledged");
        assert_eq!(&*meta.topic, "other");
        assert_eq!(meta.offset, i as u64);
    }
}

/// Under a full window the open batch grows, but never past the topic's own
/// `max_batch_bytes` when that is below the producer's: a batch over it
/// would be refused (`BATCH_TOO_LARGE`) and fail records that are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stay_within_the_topics_limit() {
    let mut broker = Broker::start();
    let client = Client::connect(&broker.addr).await.expect("connect");
    let mut spec = TopicSpec::new(TOPIC).partitions(1);
    spec.max_batch_bytes = Some(1024);
    client.create_topic(spec).await.expect("create topic");
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        max_in_flight: 1,
        ..ProducerConfig::default()
    });
    let first = producer.send_to(TOPIC, 0, record(0)).await.expect("send");
    tokio::time::timeout(ACK_TIMEOUT, first)
        .await
        .expect("warm-up acknowledged in time")
        .expect("warm-up acknowledged");
    let before = producer.stats();
    broker.pause();
    let mut deliveries = Vec::new();
    for i in 0..500 {
        deliveries.push(producer.send_to(TOPIC, 0, record(i)).await.expect("send"));
    }
    broker.resume();
    assert_in_order(deliveries, 1).await;
    // Some 20 bytes a record, 1024 bytes a batch (61 of them header).
    let batches = producer.stats().batches - before.batches;
    assert!(
        (500 * 20 / 1024..=500 * 25 / (1024 - 61) + 3).contains(&(batches as usize)),
        "500 records went in {batches} batches"
    );
}
