//! `covet topic ...`.

use clap::{Args, Subcommand};
use covet_client::TopicSpec;

use super::output::{limit, print_table, topic_json};
use super::{Conn, TableFormat};

#[derive(Subcommand, Debug)]
pub enum TopicCommand {
    /// Create a topic.
    Create(CreateArgs),
    /// List topics.
    List(ListArgs),
    /// Show a topic's partitions, start offsets and high watermarks.
    Describe(DescribeArgs),
    /// Delete a topic and all its records.
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    name: String,
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Drop records older than this (0: keep forever).
    #[arg(long)]
    retention_ms: Option<u64>,
    /// Keep each partition's log under this size (0: no limit).
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Largest batch accepted (default 8 MiB).
    #[arg(long)]
    max_batch_bytes: Option<u32>,
    /// Replicas per partition (default: the broker's).
    #[arg(long, default_value_t = 0)]
    replication_factor: u32,
    #[arg(long, value_enum)]
    format: Option<TableFormat>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long, value_enum)]
    format: Option<TableFormat>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    name: String,
    #[arg(long, value_enum)]
    format: Option<TableFormat>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    name: String,
    #[command(flatten)]
    conn: Conn,
}

pub async fn run(cmd: TopicCommand) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create(a) => {
            let client = a.conn.connect().await?;
            let spec = TopicSpec {
                name: a.name,
                partitions: a.partitions,
                retention_ms: a.retention_ms,
                retention_bytes: a.retention_bytes,
                max_batch_bytes: a.max_batch_bytes,
                replication_factor: a.replication_factor,
            };
            let info = client.create_topic(spec).await?;
            match TableFormat::resolve(a.format) {
                TableFormat::Json => println!("{}", topic_json(&info)),
                TableFormat::Table => println!(
                    "created topic {} with {} partitions",
                    info.name,
                    info.partitions.len()
                ),
            }
        }
        TopicCommand::List(a) => {
            let topics = a.conn.connect().await?.list_topics().await?;
            match TableFormat::resolve(a.format) {
                TableFormat::Json => topics.iter().for_each(|t| println!("{}", topic_json(t))),
                TableFormat::Table => {
                    let rows: Vec<Vec<String>> = topics
                        .iter()
                        .map(|t| {
                            let c = t.config.unwrap_or_default();
                            let records: u64 = t
                                .partitions
                                .iter()
                                .map(|p| p.high_watermark - p.start_offset)
                                .sum();
                            vec![
                                t.name.clone(),
                                t.partitions.len().to_string(),
                                c.replication_factor.to_string(),
                                records.to_string(),
                                limit(c.retention_ms),
                                limit(c.retention_bytes),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "TOPIC",
                            "PARTITIONS",
                            "REPLICAS",
                            "RECORDS",
                            "RETENTION_MS",
                            "RETENTION_BYTES",
                        ],
                        &rows,
                    );
                }
            }
        }
        TopicCommand::Describe(a) => {
            let t = a.conn.connect().await?.describe_topic(&a.name).await?;
            match TableFormat::resolve(a.format) {
                TableFormat::Json => println!("{}", topic_json(&t)),
                TableFormat::Table => {
                    let c = t.config.unwrap_or_default();
                    println!(
                        "topic {}  partitions {}  retention_ms {}  retention_bytes {}  max_batch_bytes {}",
                        t.name,
                        t.partitions.len(),
                        limit(c.retention_ms),
                        limit(c.retention_bytes),
                        c.max_batch_bytes
                    );
                    let rows: Vec<Vec<String>> = t
                        .partitions
                        .iter()
                        .map(|p| {
                            let replicas: Vec<String> =
                                p.replicas.iter().map(u64::to_string).collect();
                            vec![
                                p.partition.to_string(),
                                p.leader.to_string(),
                                replicas.join(","),
                                p.start_offset.to_string(),
                                p.high_watermark.to_string(),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "PARTITION",
                            "LEADER",
                            "REPLICAS",
                            "START_OFFSET",
                            "HIGH_WATERMARK",
                        ],
                        &rows,
                    );
                }
            }
        }
        TopicCommand::Delete(a) => {
            a.conn.connect().await?.delete_topic(&a.name).await?;
        }
    }
    Ok(())
}
