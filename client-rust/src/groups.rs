//! Consumer group administration: list, describe, reset and delete a
//! group's progress (see `docs/adr/0009-consumer-groups.md`). Resets and
//! deletions go to each partition's leader, which applies them through the
//! partition's Raft group.

use covet_protocol::api::{
    DeleteGroupRequest, DescribeGroupRequest, DescribeGroupResponse, GroupPartition,
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest, MemberAssignment,
    ResetGroupRequest, TopicPartition,
};

use crate::{Client, Result, StartPosition};

impl Client {
    /// Joins `group` as a new member subscribed to `topics`, at the
    /// coordinator (the metadata leader). The answer names the member and
    /// what it may consume now.
    pub async fn join_group(
        &self,
        group: &str,
        topics: &[String],
        session_timeout_ms: u32,
    ) -> Result<MemberAssignment> {
        self.router()
            .retry(|| async move {
                let mut c = self.router().controller().await?;
                let req = JoinGroupRequest {
                    group: group.to_string(),
                    topics: topics.to_vec(),
                    session_timeout_ms,
                };
                Ok(c.join_group(req).await?.into_inner())
            })
            .await
    }

    /// Keeps a member's session alive, reporting the partitions it holds;
    /// the answer is what it may consume now. `UNKNOWN_MEMBER` means the
    /// member was removed: join again.
    pub async fn heartbeat(
        &self,
        group: &str,
        member_id: &str,
        owned: &[(String, u32)],
    ) -> Result<MemberAssignment> {
        self.router()
            .retry(|| async move {
                let mut c = self.router().controller().await?;
                let req = HeartbeatRequest {
                    group: group.to_string(),
                    member_id: member_id.to_string(),
                    owned: owned
                        .iter()
                        .map(|(topic, partition)| TopicPartition {
                            topic: topic.clone(),
                            partition: *partition,
                        })
                        .collect(),
                };
                Ok(c.heartbeat(req).await?.into_inner())
            })
            .await
    }

    /// Leaves `group` at once: its partitions are reassigned without
    /// waiting for the session timeout.
    pub async fn leave_group(&self, group: &str, member_id: &str) -> Result<()> {
        self.router()
            .retry(|| async move {
                let mut c = self.router().controller().await?;
                let req = LeaveGroupRequest {
                    group: group.to_string(),
                    member_id: member_id.to_string(),
                };
                Ok(c.leave_group(req).await?.into_inner())
            })
            .await?;
        Ok(())
    }

    /// Consumer groups with progress on any partition the answering node
    /// holds.
    pub async fn list_groups(&self) -> Result<Vec<String>> {
        self.router()
            .retry(|| async move {
                let mut c = self.router().any().await?;
                Ok(c.list_groups(ListGroupsRequest {})
                    .await?
                    .into_inner()
                    .groups)
            })
            .await
    }

    /// A group's committed offset, lag and delivery counts on every
    /// partition the answering node holds (every partition on a single
    /// node; any node answers from its applied state).
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse> {
        self.router()
            .retry(|| async move {
                let mut c = self.router().any().await?;
                let req = DescribeGroupRequest {
                    group: group.to_string(),
                };
                Ok(c.describe_group(req).await?.into_inner())
            })
            .await
    }

    /// [`Client::describe_group`] as node `node` answers it from its own
    /// applied state, for comparing replicas.
    pub async fn describe_group_on(&self, node: u64, group: &str) -> Result<DescribeGroupResponse> {
        let _ = self.router().metadata().await?;
        let mut c = self
            .router()
            .node(node)
            .ok_or_else(|| crate::Error::InvalidArgument(format!("unknown node {node}")))?;
        let req = DescribeGroupRequest {
            group: group.to_string(),
        };
        Ok(c.describe_group(req).await?.into_inner())
    }

    /// Moves `group`'s committed offset on `topic` (every partition, or
    /// only `partition`) to `to`. Refused with `GROUP_ACTIVE` while a member
    /// consumes a partition, unless `force`, which ends that member's
    /// session (it rejoins). Returns each partition's progress afterwards.
    pub async fn reset_group(
        &self,
        group: &str,
        topic: &str,
        partition: Option<u32>,
        to: StartPosition,
        force: bool,
    ) -> Result<Vec<GroupPartition>> {
        let partitions = match partition {
            Some(p) => vec![p],
            None => (0..self.describe_topic(topic).await?.partitions.len() as u32).collect(),
        };
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            let view = self
                .router()
                .retry(|| async move {
                    let (_, mut c) = self.router().leader(topic, p).await?;
                    let req = ResetGroupRequest {
                        group: group.to_string(),
                        topic: topic.to_string(),
                        partition: p,
                        to: Some(to.to_api()),
                        force,
                    };
                    Ok(c.reset_group(req).await?.into_inner())
                })
                .await?;
            out.push(view);
        }
        Ok(out)
    }

    /// Forgets `group` on every partition where the answering node knows
    /// it has progress. `force` as for [`Client::reset_group`].
    pub async fn delete_group(&self, group: &str, force: bool) -> Result<()> {
        let described = self.describe_group(group).await?;
        for gp in described.partitions {
            self.router()
                .retry(|| {
                    let topic = gp.topic.clone();
                    async move {
                        let (_, mut c) = self.router().leader(&topic, gp.partition).await?;
                        let req = DeleteGroupRequest {
                            group: group.to_string(),
                            topic: topic.clone(),
                            partition: gp.partition,
                            force,
                        };
                        Ok(c.delete_group(req).await?.into_inner())
                    }
                })
                .await?;
        }
        Ok(())
    }
}
