//! Issue 7's bar: under a flood of hostile requests of every kind at once,
//! the broker keeps serving a well-behaved client, and after `kill -9` and a
//! restart every record it acknowledged is there, once, at its offset.
//!
//! The hostile side, all bounded in count and time: streams of undecodable
//! messages, batches that fail validation, topic names of 20,000
//! characters, batches from producer ids nobody allocated, a client that
//! sends 1 MiB requests and never reads an answer, and hundreds of idle
//! TCP connections.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{self, produce_bytes};
use common::{read_partition, Broker};
use covet_client::{Client, ProducerConfig, Record, StartPosition, TopicSpec};
use covet_protocol::api::ProduceResponse;
use covet_protocol::batch::BatchBuilder;
use futures::StreamExt;
use tonic::transport::{Channel, Endpoint};

const TOPIC: &str = "steady";
const PARTITIONS: u32 = 2;
/// Records the well-behaved client writes while the flood runs.
const GOOD_RECORDS: u32 = 1500;
/// How long the hostile tasks keep going at most.
const FLOOD_FOR: Duration = Duration::from_secs(8);

/// A valid one-record batch claiming an idempotent producer id.
fn stranger_batch(producer_id: i64) -> Bytes {
    let mut b = BatchBuilder::with_producer(producer_id, 0, 0);
    b.push(&Record {
        value: Bytes::from_static(b"stranger"),
        ..Default::default()
    });
    b.build().expect("batch")
}

async fn channel(addr: &str, window: Option<u32>) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .initial_stream_window_size(window)
        .connect()
        .await
        .expect("connect")
}

/// One hostile kind, repeated until `until`: each round opens a produce
/// stream carrying `messages` and reads whatever comes back.
async fn hostile_streams(addr: String, until: Instant, messages: Vec<Bytes>) -> u64 {
    let mut rounds = 0;
    while Instant::now() < until {
        let ch = channel(&addr, None).await;
        let sent = futures::stream::iter(messages.clone());
        if let Ok(mut answers) =
            raw::stream::<ProduceResponse, _>(ch, "/covet.v1.Covet/Produce", sent).await
        {
            let drain = async { while let Ok(Some(_)) = answers.message().await {} };
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        rounds += 1;
    }
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_hostile_requests_neither_stalls_nor_corrupts_a_good_client() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--segment-bytes", "65536"]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new(TOPIC).partitions(PARTITIONS))
        .await
        .unwrap();

    let until = Instant::now() + FLOOD_FOR;
    let addr = broker.addr.clone();
    let long_name = "x".repeat(20_000);
    let kinds: Vec<Vec<Bytes>> = vec![
        // Undecodable protobuf.
        vec![Bytes::from_static(&[0xff; 64])],
        // Batches that fail validation, to the real topic.
        vec![produce_bytes(1, TOPIC, Bytes::from(vec![0x5a; 300])); 20],
        // A 20,000-character unknown topic.
        vec![produce_bytes(2, &long_name, stranger_batch(-1)); 5],
        // Producer ids nobody allocated.
        (0..20)
            .map(|i| produce_bytes(3, TOPIC, stranger_batch(1_000_000 + i)))
            .collect(),
    ];
    let mut hostile = Vec::new();
    for messages in kinds {
        hostile.push(tokio::spawn(hostile_streams(addr.clone(), until, messages)));
    }
    // A client that never reads its answers, on a 1-byte window.
    let sink = channel(&addr, Some(1)).await;
    let junk = produce_bytes(4, "no-such-topic", Bytes::from(vec![7u8; 1 << 20]));
    let mut unread = Vec::new();
    for _ in 0..4 {
        let requests = futures::stream::iter(0..100).map({
            let junk = junk.clone();
            move |_| junk.clone()
        });
        let s =
            raw::stream::<ProduceResponse, _>(sink.clone(), "/covet.v1.Covet/Produce", requests);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), s).await {
            unread.push(s);
        }
    }
    // Idle connections that say nothing.
    let mut idle = Vec::new();
    for _ in 0..300 {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(c) => idle.push(c),
            Err(_) => break,
        }
    }

    // The well-behaved client, meanwhile: every record acknowledged.
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..Default::default()
    });
    let started = Instant::now();
    let mut deliveries = Vec::new();
    for i in 0..GOOD_RECORDS {
        let record = Record {
            value: Bytes::from(format!("good-{i:06}")),
            ..Default::default()
        };
        deliveries.push(producer.send(TOPIC, record).await.expect("send"));
        // Spread over the flood (load shaping, not synchronisation): ten
        // waves, 400 ms apart.
        if (i + 1) % (GOOD_RECORDS / 10) == 0 {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    let mut acked: BTreeMap<(u32, u64), Bytes> = BTreeMap::new();
    for (i, d) in deliveries.into_iter().enumerate() {
        let meta = tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .unwrap_or_else(|_| panic!("record {i} not acknowledged within 30 s of the flood"))
            .unwrap_or_else(|e| panic!("record {i} failed under the flood: {e}"));
        let value = Bytes::from(format!("good-{i:06}"));
        assert!(
            acked.insert((meta.partition, meta.offset), value).is_none(),
            "offset acknowledged twice"
        );
    }
    let elapsed = started.elapsed();
    eprintln!("{GOOD_RECORDS} records acknowledged in {elapsed:?} under the flood");
    assert!(
        Instant::now() < until,
        "the flood outlasted the good client's writes"
    );
    for h in hostile {
        let rounds = h.await.expect("hostile task");
        assert!(rounds > 0, "a hostile kind never ran");
    }
    drop((unread, idle, sink));

    // Power to the process goes; what was acknowledged stays.
    broker.kill9();
    broker.restart();
    let client = Client::connect(&broker.addr).await.unwrap();
    for p in 0..PARTITIONS {
        let got: BTreeMap<u64, Bytes> = read_partition(&client, TOPIC, p, StartPosition::Earliest)
            .await
            .into_iter()
            .map(|r| (r.offset, r.value))
            .collect();
        for ((_, offset), value) in acked.range((p, 0)..=(p, u64::MAX)) {
            assert_eq!(
                got.get(offset),
                Some(value),
                "partition {p} offset {offset}"
            );
        }
        let values: Vec<&Bytes> = got.values().collect();
        let mut unique = values.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            values.len(),
            "partition {p} holds a record twice"
        );
        assert!(
            got.values().all(|v| v.starts_with(b"good-")),
            "partition {p} holds a record no good client wrote"
        );
    }
}
