//! `covet publish`.

use bytes::Bytes;
use clap::Args;
use covet_client::{Header, ProducerConfig, Record};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::Conn;

#[derive(Args, Debug)]
pub struct PublishArgs {
    topic: String,
    /// The record's key (partitions by hash of it).
    #[arg(long)]
    key: Option<String>,
    /// A header KEY=VALUE; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Publish to this partition instead of choosing by key.
    #[arg(long)]
    partition: Option<u32>,
    /// The value; without it each line of standard input is one record.
    value: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("header '{s}' is not KEY=VALUE")),
    }
}

/// Publishes and exits 0 only after every record is acknowledged.
pub async fn run(a: PublishArgs) -> anyhow::Result<()> {
    let client = a.conn.connect().await?;
    let producer = client.producer(ProducerConfig::default());
    let headers: Vec<Header> = a
        .headers
        .iter()
        .map(|(k, v)| Header {
            key: k.clone(),
            value: Bytes::from(v.clone()),
        })
        .collect();
    let make = |value: String| Record {
        key: a.key.clone().map(Bytes::from),
        value: Bytes::from(value),
        headers: headers.clone(),
        timestamp_ms: covet_broker::now_ms(),
    };
    // Deliveries are awaited in order on another task, so memory stays
    // bounded however long standard input is.
    let (tx, mut rx) = mpsc::channel::<covet_client::Delivery>(65_536);
    let waiter = tokio::spawn(async move {
        let mut count = 0u64;
        while let Some(d) = rx.recv().await {
            d.await?;
            count += 1;
        }
        Ok::<u64, covet_client::Error>(count)
    });
    let send = |record: Record| {
        let producer = producer.clone();
        let topic = a.topic.clone();
        let partition = a.partition;
        async move {
            match partition {
                Some(p) => producer.send_to(&topic, p, record).await,
                None => producer.send(&topic, record).await,
            }
        }
    };
    match &a.value {
        Some(v) => {
            let _ = tx.send(send(make(v.clone())).await?).await;
        }
        None => {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await? {
                if tx.send(send(make(line)).await?).await.is_err() {
                    break; // the waiter stopped on an error; it reports it
                }
            }
        }
    }
    drop(tx);
    producer.flush().await?;
    waiter.await??;
    Ok(())
}
