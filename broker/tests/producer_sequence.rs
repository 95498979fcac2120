//! The idempotent producer's sequence rules against a real `covet broker`
//! process (issue 6): a batch refused for good must not drag healthy
//! batches behind it down with it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{read_partition, Broker};
use covet_client::{Client, ProducerConfig, Reason, Record, StartPosition, TopicSpec};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{InitProducerRequest, ProduceRequest};
use covet_protocol::batch;

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
    read_partition(client, topic, 0, StartPosition::Earliest)
        .await
        .into_iter()
        .map(|r| (r.offset, String::from_utf8(r.value.to_vec()).unwrap()))
        .collect()
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
    // No linger and two in flight: the oversized record is closed alone (it
    // is full) and queued behind the two in flight, and the records after
    // it fill one open batch that goes out, in the next epoch, once a slot
    // frees.
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

/// One produce request on a fresh stream: (base offset, error reason).
async fn produce_raw(addr: &str, batch: Bytes) -> (u64, Option<String>) {
    let req = ProduceRequest {
        request_id: 1,
        topic: "first".into(),
        partition: 0,
        batch,
    };
    let mut responses = CovetClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .produce(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = responses.message().await.unwrap().expect("one response");
    (resp.base_offset, resp.error.map(|e| e.reason))
}

fn sequenced(producer_id: i64, epoch: i16, sequence: i32, n: usize) -> Bytes {
    let mut b = batch::BatchBuilder::with_producer(producer_id, epoch, sequence);
    for i in 0..n {
        b.push(&record(format!("s{}", sequence as usize + i)));
    }
    b.build().unwrap()
}

/// Issue 6, first scenario, as the broker process sees it (the two
/// leaders themselves need a cluster): a new producer's second batch
/// arrives before its first, which was sent to a leader since deposed. It
/// is refused as out of order instead of being taken as the producer's
/// start; the first batch, and then the second, are stored when they
/// arrive, and a resend of the first in a later epoch gets its offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_producers_overtaking_batch_waits_for_its_first() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("first").partitions(1))
        .await
        .unwrap();
    let pid = CovetClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap()
        .init_producer(InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    let ooo = Some(Reason::OutOfOrderSequence.as_str().to_string());

    assert_eq!(
        produce_raw(&broker.addr, sequenced(pid, 0, 3, 2)).await.1,
        ooo
    );
    assert_eq!(
        produce_raw(&broker.addr, sequenced(pid, 0, 0, 3)).await,
        (0, None)
    );
    assert_eq!(
        produce_raw(&broker.addr, sequenced(pid, 0, 3, 2)).await,
        (3, None)
    );
    assert_eq!(
        produce_raw(&broker.addr, sequenced(pid, 1, 0, 3)).await,
        (0, None),
        "a resend in a later epoch is the stored batch"
    );
    let stored: Vec<String> = read_all(&client, "first")
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(stored, ["s0", "s1", "s2", "s3", "s4"]);
}
