//! Consumer group administration: list, describe (from any replica's
//! applied state and the membership record every node holds), and reset
//! or delete a group's progress on a partition (at its leader, through its
//! Raft group).

use std::collections::{BTreeMap, BTreeSet};

use covet_protocol::api::{
    position, DescribeGroupResponse, GroupMember, GroupPartition, Position, TopicPartition,
};
use covet_protocol::internal::{GroupCommit, GroupDelete, GroupReset};
use covet_protocol::topic::validate_group_name;

use crate::catalog::{Catalog, LocalReplica, PartitionHandle};
use crate::consumer::session::GroupSessions;
use crate::driver::NodeHandle;
use crate::error::{BrokerError, Result};
use crate::state::groups::GroupEntry;
use crate::subscribe::blocking;

/// Groups with progress on any partition this node holds, or with
/// members, by name.
pub fn list(catalog: &Catalog) -> Vec<String> {
    let mut names: BTreeSet<String> = catalog
        .consumer_groups()
        .values()
        .filter(|r| !r.members.is_empty())
        .map(|r| r.name.clone())
        .collect();
    for topic in catalog.topics() {
        for p in &topic.partitions {
            if let Some(local) = &p.local {
                names.extend(local.groups.borrow().keys().cloned());
            }
        }
    }
    names.into_iter().collect()
}

/// `group`'s progress on every partition this node holds a replica of.
pub fn describe(catalog: &Catalog, group: &str) -> Result<DescribeGroupResponse> {
    validate_group_name(group).map_err(BrokerError::InvalidRequest)?;
    let record = catalog.consumer_groups().get(group).cloned();
    let members: Vec<GroupMember> = record
        .iter()
        .flat_map(|r| &r.members)
        .map(|m| GroupMember {
            id: m.id.clone(),
            topics: m.topics.clone(),
            partitions: m
                .granted
                .iter()
                .map(|p| TopicPartition {
                    topic: p.topic.clone(),
                    partition: p.partition,
                })
                .collect(),
            session_timeout_ms: m.session_timeout_ms,
        })
        .collect();
    let holder: BTreeMap<(&str, u32), &str> = members
        .iter()
        .flat_map(|m| {
            m.partitions
                .iter()
                .map(move |p| ((p.topic.as_str(), p.partition), m.id.as_str()))
        })
        .collect();
    let mut partitions = Vec::new();
    let mut topics = catalog.topics();
    topics.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    for topic in topics {
        for p in &topic.partitions {
            let Some(local) = &p.local else { continue };
            let state = local.groups.borrow().get(group).cloned();
            if let Some(state) = state {
                let mut v = view(&topic.record.name, p, local, &state);
                if let Some(m) = holder.get(&(topic.record.name.as_str(), p.partition)) {
                    v.member = m.to_string();
                }
                partitions.push(v);
            }
        }
    }
    Ok(DescribeGroupResponse {
        group: group.to_string(),
        partitions,
        generation: record.as_ref().map_or(0, |r| r.generation),
        members,
    })
}

fn view(topic: &str, p: &PartitionHandle, local: &LocalReplica, s: &GroupCommit) -> GroupPartition {
    let progress = *local.progress.borrow();
    let (leader, _) = *local.leader.borrow();
    let from = s.committed.max(progress.start_offset);
    GroupPartition {
        topic: topic.to_string(),
        partition: p.partition,
        committed: s.committed,
        start_offset: progress.start_offset,
        high_watermark: progress.high_watermark,
        lag: progress.high_watermark.saturating_sub(from),
        delivered_unacked: u32::try_from(s.deliveries.len()).unwrap_or(u32::MAX),
        redelivered: u32::try_from(s.deliveries.iter().filter(|d| d.count > 1).count())
            .unwrap_or(u32::MAX),
        leader,
        member: String::new(),
    }
}

/// Moves `group`'s committed offset on `partition` (which this node must
/// lead) to `to`; returns the partition's view afterwards.
pub async fn reset(
    sessions: &GroupSessions,
    node: &NodeHandle,
    topic: &str,
    partition: &PartitionHandle,
    group: &str,
    to: Option<&Position>,
    force: bool,
) -> Result<GroupPartition> {
    validate_group_name(group).map_err(BrokerError::InvalidRequest)?;
    let local = partition.leading(node.node_id)?.clone();
    let progress = *local.progress.borrow();
    let offset = match to.and_then(|p| p.kind.as_ref()) {
        Some(position::Kind::Earliest(_)) => progress.start_offset,
        Some(position::Kind::Latest(_)) => progress.high_watermark,
        Some(position::Kind::Offset(o)) if *o > progress.high_watermark => {
            return Err(BrokerError::OffsetOutOfRange {
                requested: *o,
                start: progress.start_offset,
                end: progress.high_watermark,
            })
        }
        Some(position::Kind::Offset(o)) => (*o).max(progress.start_offset),
        Some(position::Kind::TimestampMs(ts)) => {
            let (index, ts) = (local.index.clone(), *ts);
            blocking(move || index.offset_for_time(ts))
                .await
                .map_err(|s| BrokerError::Internal(s.message().to_string()))??
                .unwrap_or(progress.high_watermark)
                .clamp(progress.start_offset, progress.high_watermark)
        }
        None => {
            return Err(BrokerError::InvalidRequest(
                "a reset needs a position: earliest, latest, an offset or a time".into(),
            ))
        }
    };
    let entry = GroupEntry::Reset(GroupReset {
        group: group.to_string(),
        offset,
    });
    sessions
        .rewrite(node, group, partition.group, entry, force)
        .await?;
    let state = local
        .groups
        .borrow()
        .get(group)
        .cloned()
        .ok_or_else(|| BrokerError::Internal("the reset left no group state".into()))?;
    Ok(view(topic, partition, &local, &state))
}

/// Forgets `group` on `partition` (which this node must lead).
pub async fn delete(
    sessions: &GroupSessions,
    node: &NodeHandle,
    partition: &PartitionHandle,
    group: &str,
    force: bool,
) -> Result<()> {
    validate_group_name(group).map_err(BrokerError::InvalidRequest)?;
    partition.leading(node.node_id)?;
    let entry = GroupEntry::Delete(GroupDelete {
        group: group.to_string(),
    });
    sessions
        .rewrite(node, group, partition.group, entry, force)
        .await
}
