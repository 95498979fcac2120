//! End-to-end tests against a real `covet broker` process.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::{read_partition, wait_until, Broker};
use covet_client::{Client, ProducerConfig, Reason, Record, StartPosition, TopicSpec};

fn record(key: Option<String>, value: String, ts: i64) -> Record {
    Record {
        key: key.map(Bytes::from),
        value: Bytes::from(value),
        headers: vec![],
        timestamp_ms: ts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produces_100k_records_over_partitions_and_reads_them_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("orders").partitions(4))
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..100_000u32 {
        let key = format!("customer-{}", i % 97);
        let d = producer
            .send(
                "orders",
                record(
                    Some(key.clone()),
                    format!("{key}:{i}"),
                    1_700_000_000_000 + i as i64,
                ),
            )
            .await
            .unwrap();
        deliveries.push((key, i, d));
    }
    producer.flush().await.unwrap();
    // What the broker acknowledged, per partition, in offset order.
    let mut acked: HashMap<u32, Vec<(u64, String)>> = HashMap::new();
    for (key, i, d) in deliveries {
        let meta = d.await.unwrap();
        assert_eq!(
            meta.partition,
            covet_client::partitioner::partition_for_key(key.as_bytes(), 4)
        );
        acked
            .entry(meta.partition)
            .or_default()
            .push((meta.offset, format!("{key}:{i}")));
    }
    let mut total = 0;
    for p in 0..4 {
        let expect = acked.remove(&p).unwrap_or_default();
        // Offsets are dense from 0 and in send order.
        for (n, (off, _)) in expect.iter().enumerate() {
            assert_eq!(*off, n as u64, "partition {p}");
        }
        let got = read_partition(&client, "orders", p, StartPosition::Earliest).await;
        let got: Vec<(u64, String)> = got
            .into_iter()
            .map(|r| (r.offset, String::from_utf8(r.value.to_vec()).unwrap()))
            .collect();
        assert_eq!(got, expect, "partition {p}");
        total += got.len();
    }
    assert_eq!(total, 100_000);
    let info = client.describe_topic("orders").await.unwrap();
    let hw: u64 = info.partitions.iter().map(|p| p.high_watermark).sum();
    assert_eq!(hw, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_keeps_every_acknowledged_record_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &["--segment-bytes", "262144"]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("events").partitions(3))
        .await
        .unwrap();

    // Produce unique values until well past 30,000 acks, recording each ack.
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..Default::default()
    });
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let prod = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let value = format!("event-{n:09}");
            let Ok(d) = producer
                .send_to("events", (n % 3) as u32, record(None, value.clone(), 1))
                .await
            else {
                break;
            };
            let tx = ack_tx.clone();
            tokio::spawn(async move {
                if let Ok(meta) = d.await {
                    let _ = tx.send((meta.partition, meta.offset, value));
                }
            });
            n += 1;
            if n >= 2_000_000 {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    while acked.len() < 30_000 {
        acked.push(ack_rx.recv().await.expect("acks flow"));
    }
    broker.kill9();
    // Collect every ack that made it out before the kill.
    while let Ok(Some(a)) = tokio::time::timeout(Duration::from_secs(5), ack_rx.recv()).await {
        acked.push(a);
    }
    prod.abort();

    broker.restart();
    let client = Client::connect(&broker.addr).await.unwrap();
    let mut stored: HashMap<(u32, u64), String> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for p in 0..3 {
        let records = read_partition(&client, "events", p, StartPosition::Earliest).await;
        let mut last: Option<u64> = None;
        for r in records {
            let v = String::from_utf8(r.value.to_vec()).unwrap();
            assert!(seen.insert(v.clone()), "duplicate record {v}");
            // Within a partition, values were sent in increasing order.
            let n: u64 = v["event-".len()..].parse().unwrap();
            assert!(last.is_none_or(|l| l < n), "reordered: {v} after {last:?}");
            last = Some(n);
            stored.insert((p, r.offset), v);
        }
    }
    for (p, off, v) in &acked {
        assert_eq!(
            stored.get(&(*p, *off)),
            Some(v),
            "acknowledged record lost: partition {p} offset {off}"
        );
    }
    assert!(acked.len() >= 30_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_bytes_and_by_age_trims_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        dir.path(),
        &["--segment-bytes", "65536", "--retention-check-ms", "50"],
    );
    let client = Client::connect(&broker.addr).await.unwrap();
    let value = "v".repeat(1000);

    // By bytes: ~2 MB written, limit 256 KiB.
    let mut spec = TopicSpec::new("by-bytes");
    spec.retention_bytes = Some(256 * 1024);
    client.create_topic(spec).await.unwrap();
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        max_batch_bytes: 16 * 1024,
        ..Default::default()
    });
    for i in 0..2000 {
        producer
            .send(
                "by-bytes",
                record(None, format!("{i}:{value}"), covet_broker::now_ms()),
            )
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let trimmed = wait_until(Duration::from_secs(20), || async {
        let p = &client.describe_topic("by-bytes").await.unwrap().partitions[0];
        p.start_offset > 0 && (p.high_watermark - p.start_offset) * 1000 <= 256 * 1024 + 2 * 65536
    })
    .await;
    assert!(trimmed, "retention by bytes did not trim");
    let p = client.describe_topic("by-bytes").await.unwrap().partitions[0].clone();
    assert_eq!(p.high_watermark, 2000);
    let records = read_partition(&client, "by-bytes", 0, StartPosition::Earliest).await;
    assert_eq!(records.first().map(|r| r.offset), Some(p.start_offset));
    let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (p.start_offset..2000).collect::<Vec<_>>());

    // By age: 1000 records stamped two hours ago, then 200 fresh ones; the
    // limit is one hour.
    let mut spec = TopicSpec::new("by-age");
    spec.retention_ms = Some(3_600_000);
    client.create_topic(spec).await.unwrap();
    let old = covet_broker::now_ms() - 7_200_000;
    for i in 0..1000 {
        producer
            .send("by-age", record(None, format!("old-{i}:{value}"), old))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    for i in 0..200 {
        producer
            .send(
                "by-age",
                record(None, format!("new-{i}:{value}"), covet_broker::now_ms()),
            )
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let trimmed = wait_until(Duration::from_secs(20), || async {
        client.describe_topic("by-age").await.unwrap().partitions[0].start_offset >= 800
    })
    .await;
    assert!(trimmed, "retention by age did not trim");
    let records = read_partition(&client, "by-age", 0, StartPosition::Earliest).await;
    let fresh = records
        .iter()
        .filter(|r| r.value.starts_with(b"new-"))
        .count();
    assert_eq!(fresh, 200, "fresh records must survive");
    assert!(records
        .iter()
        .all(|r| r.offset >= 800 || r.value.starts_with(b"old-")));

    // A restart sees the trimmed log, not the old one.
    drop(client);
    let mut broker = broker;
    broker.restart();
    let client = Client::connect(&broker.addr).await.unwrap();
    let again = client.describe_topic("by-bytes").await.unwrap().partitions[0].clone();
    assert!(again.start_offset >= p.start_offset);
    assert_eq!(again.high_watermark, 2000);
    let records = read_partition(&client, "by-bytes", 0, StartPosition::Earliest).await;
    assert_eq!(records.len() as u64, 2000 - again.start_offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_latest_offset_and_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("pos")).await.unwrap();
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(0),
        ..Default::default()
    });
    for i in 0..100i64 {
        // Ten batches of ten, timestamps 1000, 2000, ...
        let d = producer
            .send("pos", record(None, format!("r{i}"), 1000 * (i / 10 + 1)))
            .await
            .unwrap();
        if i % 10 == 9 {
            producer.flush().await.unwrap();
            d.await.unwrap();
        }
    }
    let from_offset = read_partition(&client, "pos", 0, StartPosition::Offset(42)).await;
    assert_eq!(from_offset.first().map(|r| r.offset), Some(42));
    assert_eq!(from_offset.len(), 58);
    let from_time = read_partition(&client, "pos", 0, StartPosition::Timestamp(5000)).await;
    assert_eq!(from_time.first().map(|r| r.offset), Some(40));
    let past_end = client
        .open_partition("pos", 0, StartPosition::Offset(101), 10)
        .await;
    assert_eq!(
        past_end.err().and_then(|e| e.reason()),
        Some(Reason::OffsetOutOfRange)
    );

    // Latest sees only what is committed after it opened, pushed without polling.
    let mut sub = client
        .open_partition("pos", 0, StartPosition::Latest, 10)
        .await
        .unwrap();
    assert_eq!(sub.position(), 100);
    producer
        .send("pos", record(None, "tail".into(), 1))
        .await
        .unwrap()
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), sub.next_batch())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].offset, &got[0].value[..]), (100, &b"tail"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_bounds_what_the_broker_sends() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("credit")).await.unwrap();
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(0),
        ..Default::default()
    });
    for i in 0..50 {
        // One record per batch: flush each.
        producer
            .send("credit", record(None, format!("{i}"), 1))
            .await
            .unwrap();
        producer.flush().await.unwrap();
    }
    let mut stream = client
        .open_partition("credit", 0, StartPosition::Earliest, 5)
        .await
        .unwrap();
    let mut got = 0;
    while got < 5 {
        got += stream.next_batch().await.unwrap().unwrap().len();
    }
    assert_eq!(got, 5);
    // With no credit left, nothing more arrives.
    let more = tokio::time::timeout(Duration::from_millis(300), stream.next_batch()).await;
    assert!(more.is_err(), "broker sent past the credit");
    stream.grant(45).await.unwrap();
    while got < 50 {
        got += stream.next_batch().await.unwrap().unwrap().len();
    }
    assert_eq!(stream.position(), 50);
}
