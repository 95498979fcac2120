//! Bad input gets a stable reason and writes nothing.

mod common;

use bytes::Bytes;
use common::Broker;
use covet_client::{Client, Reason, Record, TopicSpec};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::ProduceRequest;
use covet_protocol::batch;
use covet_protocol::reason::reason_of;

async fn raw(addr: &str) -> CovetClient<tonic::transport::Channel> {
    CovetClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Sends one produce request on a fresh stream; returns the in-stream
/// error reason, if any.
async fn produce_raw(addr: &str, topic: &str, partition: u32, batch: Bytes) -> Option<String> {
    let req = ProduceRequest {
        request_id: 7,
        topic: topic.into(),
        partition,
        batch,
    };
    let mut responses = raw(addr)
        .await
        .produce(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = responses.message().await.unwrap().expect("one response");
    assert_eq!(resp.request_id, 7);
    resp.error.map(|e| e.reason)
}

fn valid_batch(n: usize, size: usize) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            value: Bytes::from(vec![b'a' + (i % 26) as u8; size]),
            ..Default::default()
        })
        .collect();
    batch::encode(&records).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_has_a_stable_reason_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();

    for bad in ["", ".", "..", "a b", "x/y", &"n".repeat(250)] {
        let err = client.create_topic(TopicSpec::new(bad)).await.unwrap_err();
        assert_eq!(err.reason(), Some(Reason::InvalidTopicName), "{bad:?}");
    }
    assert!(
        client.list_topics().await.unwrap().is_empty(),
        "nothing half-created"
    );
    let mut spec = TopicSpec::new("t");
    spec.max_batch_bytes = Some(4096);
    client.create_topic(spec).await.unwrap();
    let err = client.create_topic(TopicSpec::new("t")).await.unwrap_err();
    assert_eq!(err.reason(), Some(Reason::TopicExists));
    let err = client.describe_topic("nope").await.unwrap_err();
    assert_eq!(err.reason(), Some(Reason::UnknownTopic));
    let err = client
        .create_topic(TopicSpec::new("zero-batch").partitions(100_000))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), Some(Reason::InvalidConfig));

    let good = valid_batch(3, 10);
    assert_eq!(
        produce_raw(&broker.addr, "nope", 0, good.clone())
            .await
            .as_deref(),
        Some("UNKNOWN_TOPIC")
    );
    assert_eq!(
        produce_raw(&broker.addr, "t", 9, good.clone())
            .await
            .as_deref(),
        Some("UNKNOWN_PARTITION")
    );
    let mut flipped = good.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    assert_eq!(
        produce_raw(&broker.addr, "t", 0, flipped.into())
            .await
            .as_deref(),
        Some("CORRUPT_BATCH")
    );
    let truncated = good.slice(..good.len() - 3);
    assert_eq!(
        produce_raw(&broker.addr, "t", 0, truncated)
            .await
            .as_deref(),
        Some("CORRUPT_BATCH")
    );
    assert_eq!(
        produce_raw(&broker.addr, "t", 0, Bytes::from_static(b"junk"))
            .await
            .as_deref(),
        Some("CORRUPT_BATCH")
    );
    let big = valid_batch(10, 1000);
    assert_eq!(
        produce_raw(&broker.addr, "t", 0, big).await.as_deref(),
        Some("BATCH_TOO_LARGE")
    );

    // None of it was written.
    let p = client.describe_topic("t").await.unwrap().partitions[0].clone();
    assert_eq!((p.start_offset, p.high_watermark), (0, 0));
    // A good batch after all that lands at offset 0.
    assert_eq!(produce_raw(&broker.addr, "t", 0, good).await, None);
    assert_eq!(
        client.describe_topic("t").await.unwrap().partitions[0].high_watermark,
        3
    );

    // Unary errors carry the reason in metadata.
    let status = raw(&broker.addr)
        .await
        .describe_topic(covet_protocol::api::DescribeTopicRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status), Some(Reason::UnknownTopic));
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_removes_its_data_and_the_name_can_be_reused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("gone").partitions(2))
        .await
        .unwrap();
    assert_eq!(
        produce_raw(&broker.addr, "gone", 1, valid_batch(5, 5)).await,
        None
    );
    client.delete_topic("gone").await.unwrap();
    assert_eq!(
        client.describe_topic("gone").await.unwrap_err().reason(),
        Some(Reason::UnknownTopic)
    );
    assert_eq!(
        client.delete_topic("gone").await.unwrap_err().reason(),
        Some(Reason::UnknownTopic)
    );
    client
        .create_topic(TopicSpec::new("gone").partitions(2))
        .await
        .unwrap();
    let p = client.describe_topic("gone").await.unwrap().partitions[1].clone();
    assert_eq!(
        p.high_watermark, 0,
        "a new topic of the same name starts empty"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_a_topic_delete_restarts_without_the_topic() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("short-lived").partitions(3))
        .await
        .unwrap();
    client.create_topic(TopicSpec::new("kept")).await.unwrap();
    assert_eq!(
        produce_raw(&broker.addr, "short-lived", 2, valid_batch(4, 8)).await,
        None
    );
    assert_eq!(
        produce_raw(&broker.addr, "kept", 0, valid_batch(4, 8)).await,
        None
    );
    client.delete_topic("short-lived").await.unwrap();
    broker.kill9();
    broker.restart();
    let client = Client::connect(&broker.addr).await.unwrap();
    let names: Vec<String> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["kept".to_string()]);
    assert_eq!(
        client.describe_topic("kept").await.unwrap().partitions[0].high_watermark,
        4
    );
}
