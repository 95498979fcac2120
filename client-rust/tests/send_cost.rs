//! The producer's per-record cost, for measuring under callgrind (ignored
//! by default; timing on a shared machine is noise, instruction counts are
//! not).
//!
//! ```text
//! COVET_COST_RECORDS=20000 valgrind --tool=callgrind \
//!     --toggle-collect='*Producer::send_to*' \
//!     target/debug/deps/send_cost-* --ignored --test-threads=1
//! ```
//!
//! counts the instructions spent in `send_to` (the per-record path: lock,
//! append, `Delivery`); without `--toggle-collect`, the difference between
//! two runs with different `COVET_COST_RECORDS` divided by the difference
//! in records is the whole client-side cost of a record, acknowledgement
//! included. `COVET_COST_LINGER_MS` (default 0) sets the linger; a long one
//! keeps batch closing out of `send_to` (the records go on `flush`), so
//! that the count is the append path alone.

mod common;

use std::time::Duration;

use bytes::Bytes;
use covet_client::{Client, ProducerConfig, Record, TopicSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand under callgrind"]
async fn send_cost() {
    let records: usize = std::env::var("COVET_COST_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let broker = common::Broker::start();
    let client = Client::connect(&broker.addr).await.expect("connect");
    client
        .create_topic(TopicSpec::new("cost").partitions(1))
        .await
        .expect("create topic");
    let linger = std::env::var("COVET_COST_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    let producer = client.producer(ProducerConfig {
        linger,
        ..ProducerConfig::default()
    });
    let value = Bytes::from(vec![7u8; 128]);
    let warm = producer
        .send_to(
            "cost",
            0,
            Record {
                value: value.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("send");
    producer.flush().await.expect("flush");
    warm.await.expect("warm-up acknowledged");
    let mut deliveries = Vec::with_capacity(records);
    for _ in 0..records {
        let record = Record {
            value: value.clone(),
            ..Default::default()
        };
        deliveries.push(producer.send_to("cost", 0, record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    let acked = tokio::time::timeout(
        Duration::from_secs(600),
        futures::future::join_all(deliveries),
    )
    .await
    .expect("acknowledged in time");
    assert!(acked.iter().all(|d| d.is_ok()));
    let stats = producer.stats();
    println!(
        "{records} records, {} batches, {:.1} records per batch",
        stats.batches,
        stats.records_per_batch()
    );
}

/// Throughput with a window of outstanding records (awaited in send
/// order), for checking direction only: the figure printed is noise on a
/// shared machine and a debug build.
///
/// ```text
/// COVET_COST_RECORDS=20000 COVET_COST_WINDOW=256 cargo test -p covet-client \
///     --test send_cost window_throughput -- --ignored --nocapture
/// ```
///
/// `COVET_COST_LINGER_MS` and `COVET_COST_MAX_IN_FLIGHT` set the producer's
/// linger (default 0) and in-flight window per partition (default: the
/// producer's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn window_throughput() {
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let records = env("COVET_COST_RECORDS", 20_000);
    let window = env("COVET_COST_WINDOW", 256).max(1);
    let broker = common::Broker::start();
    let client = Client::connect(&broker.addr).await.expect("connect");
    client
        .create_topic(TopicSpec::new("cost").partitions(1))
        .await
        .expect("create topic");
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(env("COVET_COST_LINGER_MS", 0) as u64),
        max_in_flight: env(
            "COVET_COST_MAX_IN_FLIGHT",
            ProducerConfig::default().max_in_flight,
        ),
        ..ProducerConfig::default()
    });
    let value = Bytes::from(vec![7u8; 128]);
    let record = || Record {
        value: value.clone(),
        ..Default::default()
    };
    let warm = producer.send_to("cost", 0, record()).await.expect("send");
    producer.flush().await.expect("flush");
    warm.await.expect("warm-up acknowledged");
    let before = producer.stats();
    let start = std::time::Instant::now();
    let mut outstanding = std::collections::VecDeque::with_capacity(window);
    for _ in 0..records {
        if outstanding.len() == window {
            let d: covet_client::Delivery = outstanding.pop_front().expect("window");
            d.await.expect("acknowledged");
        }
        outstanding.push_back(producer.send_to("cost", 0, record()).await.expect("send"));
    }
    for d in outstanding {
        d.await.expect("acknowledged");
    }
    let secs = start.elapsed().as_secs_f64();
    let after = producer.stats();
    println!(
        "{records} records, window {window}: {:.0} records/s, {} batches",
        records as f64 / secs,
        after.batches - before.batches
    );
}
