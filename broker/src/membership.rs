//! Checks before a node is added back to the cluster.
//!
//! A node that is still a voter of any Raft group must not be "added": if
//! it was wiped, it would rejoin those groups with an empty log and could
//! grant votes that elect a leader missing acknowledged entries. So
//! `add-node N` is refused until N is gone from the metadata group and from
//! every partition group, as the groups' leaders report them. Only leaders
//! know a group's voters, and the metadata leader (which answers this call)
//! leads few of them, so it asks every other member over the client API.
//! When it cannot confirm (a member unreachable, a group without a leader)
//! it refuses too: the operator retries once the cluster is whole.

use std::time::Duration;

use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{ClusterStatusRequest, GroupStatus};

use crate::driver::{NodeHandle, META_GROUP};
use crate::error::{BrokerError, Result};
use crate::transport::Directory;

/// Bound on asking one member for its view.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Refuses to add `candidate` while any group still counts it as a voter.
pub async fn check_can_add(node: &NodeHandle, directory: &Directory, candidate: u64) -> Result<()> {
    let local = node.status().await?;
    let meta = local
        .iter()
        .find(|g| g.group == META_GROUP && g.role == "leader")
        .ok_or(BrokerError::NotLeader { leader_hint: 0 })?;
    let members: Vec<u64> = meta.replicas.iter().map(|r| r.node).collect();
    if members.contains(&candidate) {
        return Err(BrokerError::MembershipConflict(format!(
            "node {candidate} is still a member; remove it first (a wiped node must be removed \
             and gone from every group before it is added back)"
        )));
    }
    let mut views = vec![local];
    for &m in members.iter().filter(|&&m| m != node.node_id) {
        views.push(peer_status(directory, m).await?);
    }
    let topics = node.catalog.topics();
    for t in &topics {
        for p in &t.partitions {
            let leader_view = views
                .iter()
                .flatten()
                .filter(|g| g.group == p.group && g.role == "leader")
                .max_by_key(|g| g.term);
            let Some(g) = leader_view else {
                return Err(BrokerError::MembershipConflict(format!(
                    "cannot confirm node {candidate} left {}/{}: the partition has no leader now; \
                     retry",
                    t.record.name, p.partition
                )));
            };
            if g.replicas.iter().any(|r| r.node == candidate) {
                return Err(BrokerError::MembershipConflict(format!(
                    "node {candidate} is still a replica of {}/{} (group {}); wait until its \
                     removal reaches every partition, then retry",
                    t.record.name, p.partition, p.group
                )));
            }
        }
    }
    Ok(())
}

/// One member's view of its groups, bounded in time.
async fn peer_status(directory: &Directory, member: u64) -> Result<Vec<GroupStatus>> {
    let unreachable = |why: String| {
        BrokerError::MembershipConflict(format!(
            "cannot confirm the change with node {member} ({why}); retry when it is up"
        ))
    };
    let address = directory
        .get(member)
        .ok_or_else(|| unreachable("address not known yet".into()))?;
    let ask = async {
        let mut client = CovetClient::connect(format!("http://{address}"))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let view = client
            .cluster_status(ClusterStatusRequest {})
            .await
            .map_err(|e| unreachable(e.message().to_string()))?;
        Ok(view.into_inner().groups)
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask)
        .await
        .map_err(|_| unreachable("timed out".into()))?
}
