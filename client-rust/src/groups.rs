//! Consumer group administration: list, describe, reset and delete a
//! group's progress (see `docs/adr/0009-consumer-groups.md`). Resets and
//! deletions go to each partition's leader, which applies them through the
//! partition's Raft group.

use covet_protocol::api::{
    DeleteGroupRequest, DescribeGroupRequest, DescribeGroupResponse, GroupPartition,
    ListGroupsRequest, ResetGroupRequest,
};

use crate::{Client, Result, StartPosition};

impl Client {
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
