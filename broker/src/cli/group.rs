//! `covet group ...`: list, describe, reset and delete consumer groups.

use clap::{ArgGroup, Args, Subcommand};
use covet_client::{DescribeGroupResponse, GroupPartition, StartPosition};
use serde_json::json;

use super::output::print_table;
use super::{parse_time_ms, Conn, TableFormat};

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List consumer groups.
    List(ListArgs),
    /// Show a group's committed offset, high watermark and lag per
    /// partition (any node answers from its applied state).
    Describe(DescribeArgs),
    /// Move a group's committed offsets on a topic: the group handles the
    /// records from there again (or skips to there).
    Reset(ResetArgs),
    /// Forget a group's progress everywhere.
    Delete(DeleteArgs),
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
    group: String,
    #[arg(long, value_enum)]
    format: Option<TableFormat>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("to").required(true).args(["to_earliest", "to_latest", "to_offset", "to_time"])))]
pub struct ResetArgs {
    group: String,
    #[arg(long)]
    topic: String,
    /// Only this partition (default: all of the topic's).
    #[arg(long)]
    partition: Option<u32>,
    #[arg(long)]
    to_earliest: bool,
    #[arg(long)]
    to_latest: bool,
    #[arg(long)]
    to_offset: Option<u64>,
    /// An RFC 3339 time: the first record at or after it.
    #[arg(long)]
    to_time: Option<String>,
    /// Reset even while members consume: their sessions end and they
    /// rejoin from the new offsets.
    #[arg(long)]
    force: bool,
    #[arg(long, value_enum)]
    format: Option<TableFormat>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    group: String,
    /// Delete even while members consume.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    conn: Conn,
}

pub async fn run(cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::List(a) => {
            let groups = a.conn.connect().await?.list_groups().await?;
            match TableFormat::resolve(a.format) {
                TableFormat::Json => groups
                    .iter()
                    .for_each(|g| println!("{}", json!({ "group": g }))),
                TableFormat::Table => {
                    let rows: Vec<Vec<String>> = groups.iter().map(|g| vec![g.clone()]).collect();
                    print_table(&["GROUP"], &rows);
                }
            }
        }
        GroupCommand::Describe(a) => {
            let d = a.conn.connect().await?.describe_group(&a.group).await?;
            if d.partitions.is_empty() && d.members.is_empty() {
                anyhow::bail!(
                    "group '{}' has no members and no progress on any partition",
                    a.group
                );
            }
            let format = TableFormat::resolve(a.format);
            if format == TableFormat::Table {
                print_members(&d);
            }
            print_partitions(&d.group, &d.partitions, format, false);
        }
        GroupCommand::Reset(a) => {
            let to = match (a.to_earliest, a.to_latest, a.to_offset, &a.to_time) {
                (true, ..) => StartPosition::Earliest,
                (_, true, ..) => StartPosition::Latest,
                (_, _, Some(o), _) => StartPosition::Offset(o),
                (_, _, _, Some(t)) => StartPosition::Timestamp(parse_time_ms(t)?),
                _ => unreachable!("clap requires one of the --to options"),
            };
            let client = a.conn.connect().await?;
            let done = client
                .reset_group(&a.group, &a.topic, a.partition, to, a.force)
                .await?;
            print_partitions(&a.group, &done, TableFormat::resolve(a.format), true);
        }
        GroupCommand::Delete(a) => {
            a.conn
                .connect()
                .await?
                .delete_group(&a.group, a.force)
                .await?;
            eprintln!("deleted group {}", a.group);
        }
    }
    Ok(())
}

/// The membership part of `group describe` as a table: who is in the
/// group and what each may consume in the recorded generation.
fn print_members(d: &DescribeGroupResponse) {
    println!(
        "group {}: generation {}, {} member(s)",
        d.group,
        d.generation,
        d.members.len()
    );
    if d.members.is_empty() {
        println!();
        return;
    }
    let rows: Vec<Vec<String>> = d
        .members
        .iter()
        .map(|m| {
            let parts: Vec<String> = m
                .partitions
                .iter()
                .map(|p| format!("{}/{}", p.topic, p.partition))
                .collect();
            vec![
                m.id.clone(),
                m.topics.join(","),
                if parts.is_empty() {
                    "-".to_string()
                } else {
                    parts.join(",")
                },
            ]
        })
        .collect();
    print_table(&["MEMBER", "TOPICS", "PARTITIONS"], &rows);
    println!();
}

/// Partitions as JSON lines or a table (under a `group G` line if
/// `header`).
fn print_partitions(group: &str, partitions: &[GroupPartition], format: TableFormat, header: bool) {
    match format {
        TableFormat::Json => {
            for p in partitions {
                println!(
                    "{}",
                    json!({
                        "group": group,
                        "topic": p.topic,
                        "partition": p.partition,
                        "committed": p.committed,
                        "start_offset": p.start_offset,
                        "high_watermark": p.high_watermark,
                        "lag": p.lag,
                        "delivered_unacked": p.delivered_unacked,
                        "redelivered": p.redelivered,
                        "leader": p.leader,
                        "member": (!p.member.is_empty()).then_some(&p.member),
                    })
                );
            }
        }
        TableFormat::Table => {
            let rows: Vec<Vec<String>> = partitions
                .iter()
                .map(|p| {
                    vec![
                        p.topic.clone(),
                        p.partition.to_string(),
                        p.committed.to_string(),
                        p.high_watermark.to_string(),
                        p.lag.to_string(),
                        p.delivered_unacked.to_string(),
                        p.redelivered.to_string(),
                        p.leader.to_string(),
                        if p.member.is_empty() {
                            "-".to_string()
                        } else {
                            p.member.clone()
                        },
                    ]
                })
                .collect();
            if header {
                println!("group {group}");
            }
            print_table(
                &[
                    "TOPIC",
                    "PARTITION",
                    "COMMITTED",
                    "HIGH_WATERMARK",
                    "LAG",
                    "UNACKED",
                    "REDELIVERED",
                    "LEADER",
                    "MEMBER",
                ],
                &rows,
            );
        }
    }
}
