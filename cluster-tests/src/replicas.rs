//! Do all replicas hold the same committed log? Checked twice, from two
//! sides, at the end of a scenario:
//!
//! 1. **Reads** ([`replica_logs`]): every partition is read from every
//!    replica (`Client::open_replica`, served by that node even if it does
//!    not lead) up to the committed end the final read reached, and the
//!    records (offset, timestamp, key, value, headers) are compared byte
//!    for byte. A replica that lags is given time to catch up; one that
//!    refuses (`NOT_LEADER` for a partition it is assigned) or cannot
//!    serve the whole range is a failure.
//! 2. **Caught up** ([`wait_caught_up`]): every group's leader must report
//!    every replica at lag 0 within a deadline, so the disk comparison
//!    below can demand complete logs.
//! 3. **Disk** ([`compare_disk_logs`]): every node is killed, each node's
//!    Raft group directories are copied and opened with
//!    `covet-raft-store`, and every group's entries (index, term, type,
//!    data) are compared from the highest first index any replica kept
//!    (retention trims each replica on its own schedule) up to the highest
//!    commit any replica persisted: a replica whose log ends before that
//!    commit is a failure, not a shorter overlap. That covers the metadata
//!    group too, and the Raft log itself rather than what the broker serves
//!    from it. It leaves the cluster stopped, so it runs last.
//!
//! The on-disk path relies on the broker's layout, `<data-dir>/groups/<id>`
//! holding one group's log; `group_dirs` is the only place that knows it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use covet_client::{Client, ConsumedRecord};
use covet_raft_store::{GroupStorage, LogOptions};
use raft::prelude::Entry;
use raft::{GetEntriesContext, Storage, NO_LIMIT};

use crate::checker::compare_replicas;
use crate::cluster::{Cluster, NodeId};
use crate::read::{read_partition, ReadEnd, Source};
use crate::CLIENT_CALL_TIMEOUT;

/// How long a replica may take to serve a partition up to the end.
const REPLICA_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every replica of every group may take to reach lag 0.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcome of the replica comparison.
#[derive(Debug, Clone)]
pub struct ReplicaCheck {
    pub identical: bool,
    /// Always `reads+disk`: both comparisons ran.
    pub method: &'static str,
    pub detail: Vec<String>,
}

/// Why [`replica_logs`] could not read every replica.
#[derive(Debug)]
pub enum ReplicaLogsError {
    /// This node holds a replica of the partition but refused to serve it
    /// (`NOT_LEADER`): a failure, since follower reads are served.
    FollowerReadsRefused(NodeId, Option<String>),
    Other(anyhow::Error),
}

/// Compares the replicas of `topic`'s partitions, each up to its offset in
/// `ends`, by reads and then on disk; see the module docs. Leaves every
/// node stopped.
pub async fn check(cluster: &mut Cluster, topic: &str, ends: &BTreeMap<u32, u64>) -> ReplicaCheck {
    let mut out = ReplicaCheck {
        identical: true,
        method: "reads+disk",
        detail: Vec::new(),
    };
    for (&partition, &end) in ends {
        match replica_logs(cluster, topic, partition, end).await {
            Ok(logs) => match compare_replicas(&logs) {
                Ok(()) => out.detail.push(format!(
                    "{topic}/{partition}: offsets 0..{end} identical on nodes {:?}",
                    logs.iter().map(|(n, _)| *n).collect::<Vec<_>>()
                )),
                Err(e) => {
                    out.identical = false;
                    out.detail.push(format!("{topic}/{partition}: {e}"));
                }
            },
            Err(ReplicaLogsError::FollowerReadsRefused(node, error)) => {
                out.identical = false;
                out.detail.push(format!(
                    "{topic}/{partition}: node {node} is an assigned replica but refused to \
                     serve it (NOT_LEADER): {error:?}"
                ));
            }
            Err(ReplicaLogsError::Other(e)) => {
                out.identical = false;
                out.detail.push(format!("{topic}/{partition}: {e:#}"));
            }
        }
    }
    if let Err(e) = wait_caught_up(cluster, CATCH_UP_TIMEOUT).await {
        out.identical = false;
        out.detail.push(format!("{e:#}"));
    }
    let disk = disk_check(cluster).await;
    out.identical &= disk.identical;
    out.detail.extend(disk.detail);
    out
}

/// Waits until, in every group some node holds, a leader reports every
/// replica at lag 0 (matched = its last index); the error names the groups
/// still behind.
pub async fn wait_caught_up(cluster: &Cluster, timeout: Duration) -> anyhow::Result<()> {
    let client = tokio::time::timeout(
        CLIENT_CALL_TIMEOUT,
        Client::connect(&cluster.client_addrs()),
    )
    .await
    .map_err(|_| anyhow!("connecting timed out"))??;
    let last = std::sync::Mutex::new(String::from("no status answered"));
    let caught_up = crate::wait_until(timeout, || async {
        let views = tokio::time::timeout(CLIENT_CALL_TIMEOUT, client.cluster_status())
            .await
            .ok()?
            .ok()?;
        let behind = groups_behind(&views);
        let done = behind.is_empty();
        *last.lock().expect("status lock") = behind.join("; ");
        done.then_some(())
    })
    .await;
    caught_up.map_err(|_| {
        anyhow!(
            "replicas not caught up within {timeout:?}: {}",
            last.lock().expect("status lock")
        )
    })
}

/// Groups without a leader, or whose leader reports a replica behind it.
fn groups_behind(views: &[covet_client::ClusterStatusResponse]) -> Vec<String> {
    let mut groups: BTreeMap<u64, Option<&covet_client::GroupStatus>> = BTreeMap::new();
    for g in views.iter().flat_map(|v| v.groups.iter()) {
        let slot = groups.entry(g.group).or_default();
        if g.role == "leader" && slot.is_none_or(|l| l.term < g.term) {
            *slot = Some(g);
        }
    }
    groups
        .into_iter()
        .filter_map(|(group, leader)| match leader {
            None => Some(format!("group {group}: no leader")),
            Some(l) => {
                let lagging: Vec<String> = l
                    .replicas
                    .iter()
                    .filter(|r| r.lag > 0)
                    .map(|r| format!("node {} lag {} ({})", r.node, r.lag, r.state))
                    .collect();
                (!lagging.is_empty()).then(|| format!("group {group}: {}", lagging.join(", ")))
            }
        })
        .collect()
}

/// Every replica's log of one partition, records `[0, end)`, each read
/// from that node (`Client::open_replica`).
pub async fn replica_logs(
    cluster: &Cluster,
    topic: &str,
    partition: u32,
    end: u64,
) -> Result<Vec<(NodeId, Vec<ConsumedRecord>)>, ReplicaLogsError> {
    let seeds = cluster.client_addrs();
    let client = tokio::time::timeout(CLIENT_CALL_TIMEOUT, Client::connect(&seeds))
        .await
        .map_err(|_| ReplicaLogsError::Other(anyhow!("connecting timed out")))?
        .map_err(|e| ReplicaLogsError::Other(e.into()))?;
    let replicas = replicas_of(&client, cluster, topic, partition)
        .await
        .map_err(ReplicaLogsError::Other)?;
    let mut logs = Vec::new();
    for node in replicas {
        let deadline = tokio::time::Instant::now() + REPLICA_READ_TIMEOUT;
        let source = Source::Replica(node);
        let read = read_partition(&client, source, topic, partition, end, deadline).await;
        let mut records = read.records;
        match read.end {
            ReadEnd::NotLeader => {
                return Err(ReplicaLogsError::FollowerReadsRefused(
                    node,
                    read.last_error,
                ))
            }
            ReadEnd::TimedOut => {
                return Err(ReplicaLogsError::Other(anyhow!(
                    "node {node} served {} of {end} records within {REPLICA_READ_TIMEOUT:?} ({:?})",
                    records.len(),
                    read.last_error
                )))
            }
            ReadEnd::Complete => {}
        }
        // Every replica served all of [0, end) (`Complete`); what it holds
        // beyond was committed after the final read and is compared on disk.
        records.retain(|r| r.offset < end);
        logs.push((node, records));
    }
    Ok(logs)
}

/// The nodes holding `partition`, from `describe_topic` (every node if the
/// broker does not say).
async fn replicas_of(
    client: &Client,
    cluster: &Cluster,
    topic: &str,
    partition: u32,
) -> anyhow::Result<Vec<NodeId>> {
    let info = tokio::time::timeout(CLIENT_CALL_TIMEOUT, client.describe_topic(topic))
        .await
        .map_err(|_| anyhow!("describe_topic timed out"))??;
    let replicas = info
        .partitions
        .iter()
        .find(|p| p.partition == partition)
        .map(|p| p.replicas.clone())
        .unwrap_or_default();
    Ok(if replicas.is_empty() {
        cluster.node_ids()
    } else {
        replicas
    })
}

/// Kills every node and compares their Raft logs on disk.
async fn disk_check(cluster: &mut Cluster) -> ReplicaCheck {
    let mut detail = Vec::new();
    let running: Vec<NodeId> = cluster
        .node_ids()
        .into_iter()
        .filter(|&id| cluster.is_running(id))
        .collect();
    if let Err(e) = cluster.kill9_many(&running).await {
        detail.push(format!("stopping the nodes: {e:#}"));
    }
    let dirs: Vec<(NodeId, PathBuf)> = cluster
        .node_ids()
        .into_iter()
        .filter_map(|id| Some((id, cluster.data_dir(id).ok()?)))
        .collect();
    let compared = tokio::task::spawn_blocking(move || compare_disk_logs(&dirs)).await;
    let (identical, found) = match compared {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => (false, vec![format!("disk comparison failed: {e:#}")]),
        Err(e) => (false, vec![format!("disk comparison panicked: {e}")]),
    };
    detail.extend(found);
    ReplicaCheck {
        identical,
        method: "reads+disk",
        detail,
    }
}

/// Compares every Raft group held by two or more of the given (stopped)
/// nodes' data dirs over the entries all of them hold as committed.
/// Returns whether all matched, and a line per group.
pub fn compare_disk_logs(data_dirs: &[(NodeId, PathBuf)]) -> anyhow::Result<(bool, Vec<String>)> {
    let scratch = tempfile::Builder::new()
        .prefix("covet-replicas-")
        .tempdir()?;
    let mut groups: BTreeMap<u64, Vec<(NodeId, PathBuf)>> = BTreeMap::new();
    for (node, data) in data_dirs {
        for (group, dir) in group_dirs(data)? {
            groups.entry(group).or_default().push((*node, dir));
        }
    }
    let mut identical = true;
    let mut lines = Vec::new();
    for (group, holders) in groups.into_iter().filter(|(_, h)| h.len() > 1) {
        let mut stores = Vec::new();
        for (node, dir) in &holders {
            let copy = scratch.path().join(format!("{node}-{group}"));
            copy_dir(dir, &copy)?;
            let store = GroupStorage::open(&copy, LogOptions::default())
                .with_context(|| format!("opening node {node}'s group {group}"))?;
            stores.push((*node, store));
        }
        let (line, same) = compare_group(group, &stores)?;
        identical &= same;
        lines.push(line);
    }
    Ok((identical, lines))
}

/// Compares one group's committed entries across its replicas, up to the
/// highest commit any of them persisted: every replica must hold it.
fn compare_group(group: u64, stores: &[(NodeId, GroupStorage)]) -> anyhow::Result<(String, bool)> {
    let mut low = 0;
    let mut high = 0;
    for (_, s) in stores {
        low = low.max(s.first_index()?);
        high = high.max(s.hard_state().commit.min(s.last_index()?));
    }
    let mut short = Vec::new();
    for (node, s) in stores {
        let last = s.last_index()?;
        if last < high {
            short.push(format!("node {node} ends at {last}"));
        }
    }
    if !short.is_empty() {
        return Ok((
            format!(
                "group {group}: committed up to {high} but {}",
                short.join(", ")
            ),
            false,
        ));
    }
    if low > high {
        // Every replica trimmed past the commit some replica persisted
        // (retention); nothing committed is left to compare.
        return Ok((
            format!("group {group}: no committed entries left to compare ({low} > {high})"),
            true,
        ));
    }
    let mut logs: Vec<(NodeId, Vec<Entry>)> = Vec::new();
    for (node, s) in stores {
        let entries = s.entries(low, high + 1, NO_LIMIT, GetEntriesContext::empty(false))?;
        logs.push((*node, entries));
    }
    Ok(match compare_replicas(&logs) {
        Ok(()) => (
            format!("group {group}: entries {low}..={high} identical"),
            true,
        ),
        Err(e) => (format!("group {group} (entries from {low}): {e}"), false),
    })
}

/// The Raft group directories in a broker data dir: `<data>/groups/<id>`.
fn group_dirs(data_dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let groups = data_dir.join("groups");
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&groups) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", groups.display())),
    };
    for entry in entries {
        let entry = entry?;
        let id = entry.file_name().to_str().and_then(|n| n.parse().ok());
        if let (Some(id), true) = (id, entry.file_type()?.is_dir()) {
            out.push((id, entry.path()));
        }
    }
    Ok(out)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
