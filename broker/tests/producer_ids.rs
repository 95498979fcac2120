//! Idempotent-producer ids against a real `covet broker` process (issue
//! 7, item 1): a stranger's batch with an id the cluster never handed out
//! must not be stored, and must not make the real owner of that id lose
//! its first batch to a false "duplicate" answer.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{read_partition, Broker};
use covet_client::{Client, Record, StartPosition, TopicSpec};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{InitProducerRequest, ProduceRequest};
use covet_protocol::batch;

/// Longest any single call of these tests may take.
const CALL: Duration = Duration::from_secs(30);

/// One produce request on a fresh stream: (base offset, error reason).
async fn produce_raw(addr: &str, batch: Bytes) -> (u64, Option<String>) {
    let req = ProduceRequest {
        request_id: 1,
        topic: "ids".into(),
        partition: 0,
        batch,
    };
    let call = async {
        let mut responses = CovetClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .produce(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = responses.message().await.unwrap().expect("one response");
        (resp.base_offset, resp.error.map(|e| e.reason))
    };
    tokio::time::timeout(CALL, call).await.expect("answered")
}

/// A batch of one record `value` from producer `(id, epoch, sequence)`.
fn sequenced(producer_id: i64, epoch: i16, sequence: i32, value: &str) -> Bytes {
    let mut b = batch::BatchBuilder::with_producer(producer_id, epoch, sequence);
    b.push(&Record {
        key: None,
        value: Bytes::from(value.to_string()),
        headers: vec![],
        timestamp_ms: 1,
    });
    b.build().unwrap()
}

/// Every value partition 0 holds, in order.
async fn read_all(client: &Client) -> Vec<String> {
    read_partition(client, "ids", 0, StartPosition::Earliest)
        .await
        .into_iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect()
}

async fn init_producer(addr: &str) -> i64 {
    let call = async {
        CovetClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .init_producer(InitProducerRequest {})
            .await
            .unwrap()
            .into_inner()
            .producer_id
    };
    tokio::time::timeout(CALL, call).await.expect("answered")
}

/// The reproduction: a stranger writes with producer id 0 before
/// any id was allocated; then `InitProducer` hands 0 to a real producer,
/// whose first batch (sequence 0, other records) was acknowledged at the
/// stranger's offset, three times over, and never stored. Now the
/// stranger is refused (UNKNOWN_PRODUCER_ID), the real batch is stored
/// and read back, and a different batch reusing its sequence (a second
/// client sharing the id) is refused with DUPLICATE_SEQUENCE, never
/// acknowledged at the real batch's offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_producer_id_cannot_swallow_the_real_producers_batches() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("ids").partitions(1))
        .await
        .unwrap();

    let stranger = produce_raw(&broker.addr, sequenced(0, 0, 0, "stranger")).await;
    assert_eq!(stranger.1.as_deref(), Some("UNKNOWN_PRODUCER_ID"));

    let pid = init_producer(&broker.addr).await;
    assert_eq!(pid, 0, "a fresh cluster hands out id 0 first");
    for attempt in 0..3 {
        assert_eq!(
            produce_raw(&broker.addr, sequenced(pid, 0, 0, "real")).await,
            (0, None),
            "attempt {attempt}: stored once, then answered as its duplicate"
        );
    }
    let impostor = produce_raw(&broker.addr, sequenced(pid, 0, 0, "impostor")).await;
    assert_eq!(impostor.1.as_deref(), Some("DUPLICATE_SEQUENCE"));
    assert_eq!(
        produce_raw(&broker.addr, sequenced(pid, 0, 1, "next")).await,
        (1, None)
    );
    // A plain batch (no producer id) is not affected by the check.
    let plain = {
        let mut b = batch::BatchBuilder::new();
        b.push(&Record {
            key: None,
            value: Bytes::from_static(b"plain"),
            headers: vec![],
            timestamp_ms: 1,
        });
        b.build().unwrap()
    };
    assert_eq!(produce_raw(&broker.addr, plain).await, (2, None));
    assert_eq!(read_all(&client).await, ["real", "next", "plain"]);
}

/// An id far past the allocation mark is refused on every attempt, after
/// a bounded wait for this node's metadata to catch up, and nothing is
/// stored; allocated ids keep working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unallocated_producer_ids_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("ids").partitions(1))
        .await
        .unwrap();
    let pid = init_producer(&broker.addr).await;
    for id in [pid + 1, 1 << 40, i64::MAX] {
        let started = std::time::Instant::now();
        let refused = produce_raw(&broker.addr, sequenced(id, 0, 0, "x")).await;
        assert_eq!(refused, (0, Some("UNKNOWN_PRODUCER_ID".into())), "id {id}");
        assert!(started.elapsed() < Duration::from_secs(10), "bounded wait");
    }
    assert_eq!(
        produce_raw(&broker.addr, sequenced(pid, 0, 0, "ok")).await,
        (0, None)
    );
    assert_eq!(read_all(&client).await, ["ok"]);
}

/// The partition's producer table is bounded: with 1024 producers written
/// (the documented limit), the 1025th is refused with PRODUCER_TABLE_FULL
/// and stores nothing, while a producer already there keeps writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_table_refuses_a_new_producer_clearly() {
    const LIMIT: i64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("ids").partitions(1))
        .await
        .unwrap();
    let run = async {
        let mut api = CovetClient::connect(format!("http://{}", broker.addr))
            .await
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..=LIMIT {
            let id = api
                .init_producer(InitProducerRequest {})
                .await
                .unwrap()
                .into_inner()
                .producer_id;
            ids.push(id);
        }
        // One stream, one request per producer, answered in order.
        let requests: Vec<ProduceRequest> = ids
            .iter()
            .map(|&id| ProduceRequest {
                request_id: id as u64,
                topic: "ids".into(),
                partition: 0,
                batch: sequenced(id, 0, 0, "x"),
            })
            .collect();
        let mut responses = api
            .produce(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut outcomes = Vec::new();
        while let Some(r) = responses.message().await.unwrap() {
            outcomes.push((r.base_offset, r.error.map(|e| e.reason)));
        }
        (ids, outcomes)
    };
    let (ids, outcomes) = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("bounded");
    assert_eq!(outcomes.len(), ids.len());
    for (i, o) in outcomes[..LIMIT as usize].iter().enumerate() {
        assert_eq!(*o, (i as u64, None), "producer {i}");
    }
    assert_eq!(
        outcomes[LIMIT as usize].1.as_deref(),
        Some("PRODUCER_TABLE_FULL")
    );
    assert_eq!(
        produce_raw(&broker.addr, sequenced(ids[0], 0, 1, "again")).await,
        (LIMIT as u64, None),
        "a producer already there keeps writing"
    );
}
