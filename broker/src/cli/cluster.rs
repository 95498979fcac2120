//! `covet cluster ...`.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use covet_client::{ClusterStatusResponse, GroupStatus};
use serde_json::json;

use super::output::print_table;
use super::{Conn, TableFormat};

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Every node, and every Raft group's leader, term, commit index and
    /// each follower's lag.
    Status(StatusArgs),
    /// Add a node (one of `--peers`) back to the cluster's voters; the
    /// partitions assigned to it follow.
    AddNode(MemberArgs),
    /// Remove a node from the cluster's voters and from every partition.
    RemoveNode(MemberArgs),
}

#[derive(Args, Debug)]
pub struct MemberArgs {
    /// The node's id.
    node_id: u64,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, value_enum)]
    format: Option<TableFormat>,
    #[command(flatten)]
    conn: Conn,
}

pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status(a) => status(a).await,
        ClusterCommand::AddNode(a) => member(a, true).await,
        ClusterCommand::RemoveNode(a) => member(a, false).await,
    }
}

/// Each group as its leader reports it (the newest term wins), or as any
/// node does when it has no leader.
fn merge(views: &[ClusterStatusResponse]) -> Vec<GroupStatus> {
    let mut groups: BTreeMap<u64, GroupStatus> = BTreeMap::new();
    for g in views.iter().flat_map(|v| v.groups.iter()) {
        let better = match groups.get(&g.group) {
            None => true,
            Some(cur) => {
                (g.term, g.role == "leader", g.commit)
                    > (cur.term, cur.role == "leader", cur.commit)
            }
        };
        if better {
            groups.insert(g.group, g.clone());
        }
    }
    groups.into_values().collect()
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let client = a.conn.connect().await?;
    let meta = client.metadata().await?;
    let views = client.cluster_status().await?;
    let up: Vec<u64> = views.iter().map(|v| v.node_id).collect();
    let groups = merge(&views);
    // Replicas out of service, from every node's own view.
    let faults: Vec<(u64, &GroupStatus)> = views
        .iter()
        .flat_map(|v| v.groups.iter().map(move |g| (v.node_id, g)))
        .filter(|(_, g)| g.role == "faulted")
        .collect();
    match TableFormat::resolve(a.format) {
        TableFormat::Json => {
            let nodes: Vec<_> = meta
                .nodes
                .iter()
                .map(|n| json!({ "id": n.id, "address": n.address, "up": up.contains(&n.id) }))
                .collect();
            let groups: Vec<_> = groups.iter().map(group_json).collect();
            let faults: Vec<_> = faults
                .iter()
                .map(|(n, g)| json!({ "node": n, "group": g.group, "topic": g.topic, "partition": g.partition, "fault": g.fault }))
                .collect();
            println!(
                "{}",
                json!({ "nodes": nodes, "groups": groups, "faulted": faults })
            );
        }
        TableFormat::Table => {
            let rows: Vec<Vec<String>> = meta
                .nodes
                .iter()
                .map(|n| {
                    let state = if up.contains(&n.id) {
                        "up"
                    } else {
                        "unreachable"
                    };
                    vec![n.id.to_string(), n.address.clone(), state.to_string()]
                })
                .collect();
            print_table(&["NODE", "ADDRESS", "STATE"], &rows);
            println!();
            let rows: Vec<Vec<String>> = groups.iter().map(group_row).collect();
            print_table(
                &[
                    "GROUP",
                    "TOPIC",
                    "PARTITION",
                    "LEADER",
                    "TERM",
                    "COMMIT",
                    "FOLLOWER_LAG",
                ],
                &rows,
            );
            if !faults.is_empty() {
                println!();
                let rows: Vec<Vec<String>> = faults
                    .iter()
                    .map(|(n, g)| vec![n.to_string(), g.group.to_string(), g.fault.clone()])
                    .collect();
                print_table(&["FAULTED_ON_NODE", "GROUP", "REASON"], &rows);
            }
        }
    }
    Ok(())
}

fn group_json(g: &GroupStatus) -> serde_json::Value {
    let replicas: Vec<_> = g
        .replicas
        .iter()
        .map(|r| json!({ "node": r.node, "matched": r.matched, "lag": r.lag, "state": r.state }))
        .collect();
    json!({
        "group": g.group,
        "topic": if g.group == 0 { None } else { Some(&g.topic) },
        "partition": if g.group == 0 { None } else { Some(g.partition) },
        "leader": g.leader,
        "term": g.term,
        "commit": g.commit,
        "applied": g.applied,
        "last_index": g.last_index,
        "replicas": replicas,
    })
}

fn group_row(g: &GroupStatus) -> Vec<String> {
    let (topic, partition) = if g.group == 0 {
        ("(metadata)".to_string(), "-".to_string())
    } else {
        (g.topic.clone(), g.partition.to_string())
    };
    let lag: Vec<String> = g
        .replicas
        .iter()
        .filter(|r| r.node != g.leader)
        .map(|r| format!("{}:{}", r.node, r.lag))
        .collect();
    vec![
        g.group.to_string(),
        topic,
        partition,
        g.leader.to_string(),
        g.term.to_string(),
        g.commit.to_string(),
        lag.join(" "),
    ]
}

async fn member(a: MemberArgs, add: bool) -> anyhow::Result<()> {
    let client = a.conn.connect().await?;
    let voters = client.change_membership(add, a.node_id).await?;
    let voters: Vec<String> = voters.iter().map(u64::to_string).collect();
    println!("voters: {}", voters.join(","));
    Ok(())
}
