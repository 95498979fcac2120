//! `covet-client`: the async Rust client for Covet.
//!
//! It owns connecting to a cluster from a list of seed brokers, topic
//! administration, a batching producer ([`Producer`]) and credit-paced
//! consumption ([`Subscription`], [`PartitionStream`]). The `covet` command
//! line is built on it (and the Python package will be); it holds the only client-side
//! copy of the protocol logic.
//!
//! Known limits: metadata is refreshed on failures, not pushed; a
//! partition whose leader this client cannot reach is retried for 30 s and
//! then fails.

mod consumer;
mod error;
mod group_consumer;
mod groups;
mod membership;
pub mod partitioner;
mod producer;
mod routing;

use std::sync::Arc;

use covet_protocol::api::*;
use routing::Router;

pub use consumer::{
    ConsumedRecord, PartitionStream, StartPosition, Subscription, SubscriptionOptions,
};
pub use covet_protocol::api::{
    ClusterStatusResponse, DescribeGroupResponse, GroupMember, GroupPartition, GroupStatus,
    NodeInfo, PartitionInfo, ReplicaProgress, TopicConfig, TopicInfo,
};
pub use covet_protocol::batch::{Header, Record};
pub use covet_protocol::Reason;
pub use error::{Error, Result};
pub use group_consumer::{
    Acker, Assigner, GroupConsumer, GroupConsumerConfig, GroupRecord, ACK_LINGER,
};
pub use membership::{AssignmentTarget, Membership};
pub use producer::{Delivery, Producer, ProducerConfig, ProducerStats, RecordMetadata};

/// The broker address used when none is given.
pub const DEFAULT_BROKER: &str = "127.0.0.1:7420";

/// Settings for creating a topic.
#[derive(Debug, Clone, Default)]
pub struct TopicSpec {
    pub name: String,
    /// 0 means the broker's default.
    pub partitions: u32,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub max_batch_bytes: Option<u32>,
    /// 0 means the broker's default.
    pub replication_factor: u32,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>) -> Self {
        TopicSpec {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }
}

/// A connection to a Covet cluster; cheap to clone.
///
/// It bootstraps from any seed, learns every node and each partition's
/// leader from metadata, sends each call to the node that can answer it,
/// and retries through leader changes (refreshing metadata, with backoff)
/// for up to 30 s.
#[derive(Clone)]
pub struct Client {
    router: Arc<Router>,
}

impl Client {
    /// Connects to a cluster through a comma-separated seed list
    /// (`HOST:PORT[,HOST:PORT...]`); any one seed that answers is enough.
    pub async fn connect(seeds: &str) -> Result<Client> {
        Ok(Client {
            router: Arc::new(Router::connect(seeds).await?),
        })
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// Nodes and topics, freshly asked.
    pub async fn metadata(&self) -> Result<MetadataResponse> {
        Ok((*self.router.refresh().await?).clone())
    }

    pub async fn create_topic(&self, spec: TopicSpec) -> Result<TopicInfo> {
        let name = spec.name.clone();
        let req = CreateTopicRequest {
            name: spec.name,
            partitions: spec.partitions,
            retention_ms: spec.retention_ms,
            retention_bytes: spec.retention_bytes,
            max_batch_bytes: spec.max_batch_bytes,
            replication_factor: spec.replication_factor,
        };
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let created = self
            .router
            .retry(|| {
                let req = req.clone();
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    let mut c = self.router.controller().await?;
                    Ok(c.create_topic(req).await?.into_inner())
                }
            })
            .await;
        let _ = self.router.refresh().await;
        match created {
            // A retry after an attempt whose outcome was lost (a connection
            // cut, a leader change) finds the topic that attempt created.
            Err(e)
                if e.reason() == Some(Reason::TopicExists)
                    && attempts.load(std::sync::atomic::Ordering::Relaxed) > 1 =>
            {
                self.describe_topic(&name).await
            }
            other => other,
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.router
            .retry(|| async move {
                let mut c = self.router.controller().await?;
                let req = DeleteTopicRequest {
                    name: name.to_string(),
                };
                Ok(c.delete_topic(req).await?.into_inner())
            })
            .await?;
        let _ = self.router.refresh().await;
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        Ok(self.router.refresh().await?.topics.clone())
    }

    /// A topic with each partition's leader and offsets as its leader
    /// reports them.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let meta = self.router.refresh().await?;
        let mut info = meta
            .topics
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or_else(|| Error::Broker {
                reason: Reason::UnknownTopic,
                message: format!("unknown topic '{name}'"),
                leader_hint: 0,
            })?;
        // Offsets are the leader's: the answering node may lag.
        for p in info.partitions.iter_mut() {
            if p.leader == 0 || p.leader == meta.node_id {
                continue;
            }
            if let Some(mut c) = self.router.node(p.leader) {
                let req = DescribeTopicRequest {
                    name: name.to_string(),
                };
                if let Ok(t) = c.describe_topic(req).await {
                    if let Some(lp) = t.into_inner().partitions.get(p.partition as usize) {
                        *p = lp.clone();
                    }
                }
            }
        }
        Ok(info)
    }

    /// Adds `node` to the cluster's voters (it must be in the nodes'
    /// `--peers`), or removes it; returns the metadata group's voters.
    /// Partitions follow: each one's leader adds or removes the node from
    /// its replicas as the topic's assignment says.
    pub async fn change_membership(&self, add: bool, node: u64) -> Result<Vec<u64>> {
        let req = ChangeMembershipRequest {
            add_node: if add { node } else { 0 },
            remove_node: if add { 0 } else { node },
        };
        let voters = self
            .router
            .retry(|| async move {
                let mut c = self.router.controller().await?;
                Ok(c.change_membership(req).await?.into_inner().voters)
            })
            .await?;
        let _ = self.router.refresh().await;
        Ok(voters)
    }

    /// Every node's view of every Raft group.
    pub async fn cluster_status(&self) -> Result<Vec<ClusterStatusResponse>> {
        let meta = self.router.refresh().await?;
        let mut out = Vec::new();
        for n in &meta.nodes {
            if let Some(mut c) = self.router.node(n.id) {
                if let Ok(s) = c.cluster_status(ClusterStatusRequest {}).await {
                    out.push(s.into_inner());
                }
            }
        }
        Ok(out)
    }

    /// A batching, idempotent producer; see [`ProducerConfig`].
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::start(self.clone(), config)
    }

    /// Opens one partition at a position with an initial credit (records),
    /// on its leader.
    pub async fn open_partition(
        &self,
        topic: &str,
        partition: u32,
        from: StartPosition,
        credit: u64,
    ) -> Result<PartitionStream> {
        self.router
            .retry(|| async move {
                let (_, rpc) = self.router.leader(topic, partition).await?;
                PartitionStream::open(rpc, topic, partition, from, credit, false).await
            })
            .await
    }

    /// Opens one partition on a given node, leader or not: committed
    /// records as that replica has them. For diagnostics and comparing
    /// replicas.
    pub async fn open_replica(
        &self,
        node: u64,
        topic: &str,
        partition: u32,
        from: StartPosition,
        credit: u64,
    ) -> Result<PartitionStream> {
        let rpc = self
            .router
            .node(node)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown node {node}")))?;
        PartitionStream::open(rpc, topic, partition, from, credit, true).await
    }

    /// Follows several partitions (all by default), merged into one stream.
    pub async fn subscribe(&self, options: SubscriptionOptions) -> Result<Subscription> {
        Subscription::open(self, options).await
    }
}
