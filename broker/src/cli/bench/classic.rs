//! `covet bench produce` and `covet bench consume`: the first benchmarks,
//! Covet only, sized for throughput with big batches. docs/benchmarks.md
//! quotes them, so their flags and output stay as they were.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use covet_client::{ProducerConfig, Reason, Record, StartPosition, SubscriptionOptions, TopicSpec};
use serde_json::json;
use tokio::sync::mpsc;

use crate::cli::Conn;

/// One produced record in this many has its latency measured.
const LATENCY_SAMPLE: u64 = 64;

#[derive(Args, Debug)]
pub struct ProduceArgs {
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Records to produce.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Partitions of the topic, if it must be created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Replicas per partition, if the topic must be created (0: the
    /// cluster's default).
    #[arg(long, default_value_t = 0)]
    replication_factor: u32,
    #[arg(long, default_value_t = 1 << 20)]
    max_batch_bytes: usize,
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Batches in flight per partition (the producer's default).
    #[arg(long, default_value_t = 5)]
    max_in_flight: usize,
    /// Records per second to offer (0: as fast as the producer takes them).
    /// Latency figures mean something only at a rate the broker sustains.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Records to consume before stopping.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Credit window per partition, in records.
    #[arg(long, default_value_t = 20_000)]
    window: u64,
    #[command(flatten)]
    conn: Conn,
}

pub async fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    let client = a.conn.connect().await?;
    let mut spec = TopicSpec::new(a.topic.clone()).partitions(a.partitions);
    spec.replication_factor = a.replication_factor;
    match client.create_topic(spec).await {
        Ok(_) => {}
        Err(e) if e.reason() == Some(Reason::TopicExists) => {}
        Err(e) => return Err(e.into()),
    }
    let config = ProducerConfig {
        linger: Duration::from_millis(a.linger_ms),
        max_batch_bytes: a.max_batch_bytes,
        max_in_flight: a.max_in_flight,
        ..ProducerConfig::default()
    };
    let producer = client.producer(config);
    let before = total_high_watermark(&client, &a.topic).await?;
    let value = Bytes::from(vec![b'x'; a.record_size]);
    // Latency is sampled (one record in LATENCY_SAMPLE) so that measuring
    // does not cost more than producing.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, covet_client::Delivery)>();
    let waiter = tokio::spawn(async move {
        let mut latencies_us = Vec::new();
        while let Some((sent, d)) = rx.recv().await {
            d.await?;
            latencies_us.push(sent.elapsed().as_micros() as u64);
        }
        Ok::<_, covet_client::Error>(latencies_us)
    });
    let start = Instant::now();
    for i in 0..a.records {
        if a.rate > 0 {
            // Paced against an absolute schedule, so a late wake-up is made
            // up for rather than lowering the rate.
            let due = start + Duration::from_secs_f64(i as f64 / a.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let record = Record {
            value: value.clone(),
            timestamp_ms: covet_broker::now_ms(),
            ..Record::default()
        };
        if i % LATENCY_SAMPLE == 0 {
            let sent = Instant::now();
            let d = producer.send(&a.topic, record).await?;
            let _ = tx.send((sent, d));
        } else {
            producer.send(&a.topic, record).await?;
        }
    }
    drop(tx);
    producer.flush().await?;
    let secs = start.elapsed().as_secs_f64();
    let mut lat = waiter.await??;
    let acked = total_high_watermark(&client, &a.topic).await? - before;
    if acked < a.records {
        anyhow::bail!("only {acked} of {} records were acknowledged", a.records);
    }
    lat.sort_unstable();
    let pct = |q: f64| {
        let i = ((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1));
        lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    let n = a.records as f64;
    println!(
        "{}",
        json!({
            "bench": "produce",
            "records": a.records,
            "record_size": a.record_size,
            "offered_rate": a.rate,
            "seconds": secs,
            "records_per_sec": n / secs,
            "mb_per_sec": n * a.record_size as f64 / secs / 1e6,
            "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999) },
            "latency_samples": lat.len(),
        })
    );
    Ok(())
}

/// Records held by the topic: the sum of its partitions' high watermarks.
async fn total_high_watermark(client: &covet_client::Client, topic: &str) -> anyhow::Result<u64> {
    let info = client.describe_topic(topic).await?;
    Ok(info.partitions.iter().map(|p| p.high_watermark).sum())
}

pub async fn consume(a: ConsumeArgs) -> anyhow::Result<()> {
    let client = a.conn.connect().await?;
    let mut options = SubscriptionOptions::new(a.topic.clone(), StartPosition::Earliest);
    options.window = a.window;
    let mut sub = client.subscribe(options).await?;
    let start = Instant::now();
    let (mut count, mut bytes) = (0u64, 0u64);
    while count < a.records {
        match sub.next().await {
            Some(r) => {
                bytes += r?.value.len() as u64;
                count += 1;
            }
            None => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "consume",
            "records": count,
            "seconds": secs,
            "records_per_sec": count as f64 / secs,
            "mb_per_sec": bytes as f64 / secs / 1e6,
        })
    );
    Ok(())
}
