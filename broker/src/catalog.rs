//! What the request handlers can see of the node's state without asking the
//! Raft driver: topics, and for each partition its storage (to read
//! committed entries), offset index and progress.
//!
//! The driver is the only writer: it publishes a topic after creating its
//! partitions' groups and withdraws it before destroying them. Handlers take
//! the read lock just long enough to clone an `Arc`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use covet_protocol::api::{PartitionInfo, TopicConfig, TopicInfo};
use covet_protocol::internal::TopicRecord;
use covet_raft_store::GroupStorage;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::state::partition::{OffsetIndex, Progress};

/// One partition as readers see it.
#[derive(Clone)]
pub struct PartitionHandle {
    pub partition: u32,
    pub group: u64,
    /// Nodes holding a replica; the first is the preferred leader.
    pub replicas: Vec<u64>,
    /// This node's replica, if it holds one.
    pub local: Option<LocalReplica>,
}

/// A replica on this node: what reads need.
#[derive(Clone)]
pub struct LocalReplica {
    pub storage: GroupStorage,
    pub index: OffsetIndex,
    pub progress: watch::Receiver<Progress>,
    /// The group's leader as this node last heard (0 if none), and the
    /// term it leads in.
    pub leader: watch::Receiver<(u64, u64)>,
}

impl PartitionHandle {
    /// The local replica, or where to go instead.
    pub fn local(&self) -> Result<&LocalReplica> {
        self.local.as_ref().ok_or_else(|| BrokerError::NotLeader {
            leader_hint: self.replicas.first().copied().unwrap_or(0),
        })
    }

    /// The local replica if this node leads the partition.
    pub fn leading(&self, me: u64) -> Result<&LocalReplica> {
        let local = self.local()?;
        let (leader, _) = *local.leader.borrow();
        if leader != me {
            return Err(BrokerError::NotLeader {
                leader_hint: leader,
            });
        }
        Ok(local)
    }
}

/// A topic and its partitions.
pub struct TopicHandle {
    pub record: TopicRecord,
    pub partitions: Vec<PartitionHandle>,
}

impl TopicHandle {
    pub fn config(&self) -> TopicConfig {
        self.record.config.unwrap_or_default()
    }

    pub fn partition(&self, p: u32) -> Result<&PartitionHandle> {
        self.partitions
            .get(p as usize)
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: self.record.name.clone(),
                partition: p,
            })
    }

    /// The API view: configuration and each partition's offsets and leader.
    pub fn info(&self) -> TopicInfo {
        let partitions = self
            .partitions
            .iter()
            .map(|p| {
                let (progress, (leader, leader_term)) = match &p.local {
                    Some(l) => (*l.progress.borrow(), *l.leader.borrow()),
                    None => (Progress::default(), (0, 0)),
                };
                PartitionInfo {
                    partition: p.partition,
                    leader,
                    leader_term,
                    replicas: p.replicas.clone(),
                    start_offset: progress.start_offset,
                    high_watermark: progress.high_watermark,
                }
            })
            .collect();
        TopicInfo {
            name: self.record.name.clone(),
            config: self.record.config,
            partitions,
        }
    }
}

/// The topics this node serves.
pub struct Catalog {
    topics: RwLock<BTreeMap<String, Arc<TopicHandle>>>,
    /// Bumped on every change, so handlers can wait for a topic to appear
    /// or go without polling.
    generation: watch::Sender<u64>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            topics: RwLock::default(),
            generation: watch::channel(0).0,
        }
    }
}

impl Catalog {
    pub fn topic(&self, name: &str) -> Result<Arc<TopicHandle>> {
        let topics = self.topics.read().expect("catalog lock poisoned");
        topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))
    }

    pub fn topics(&self) -> Vec<Arc<TopicHandle>> {
        self.topics
            .read()
            .expect("catalog lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// A receiver that sees every change to the catalog.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub(crate) fn insert(&self, topic: TopicHandle) {
        let mut topics = self.topics.write().expect("catalog lock poisoned");
        topics.insert(topic.record.name.clone(), Arc::new(topic));
        drop(topics);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replaces this node's replica of partition group `group` (rebuilt
    /// after a fault).
    pub(crate) fn set_local(&self, group: u64, local: LocalReplica) {
        let mut topics = self.topics.write().expect("catalog lock poisoned");
        let Some(t) = topics
            .values()
            .find(|t| t.partitions.iter().any(|p| p.group == group))
        else {
            return;
        };
        let mut partitions = t.partitions.clone();
        for p in partitions.iter_mut().filter(|p| p.group == group) {
            p.local = Some(local.clone());
        }
        let updated = TopicHandle {
            record: t.record.clone(),
            partitions,
        };
        topics.insert(updated.record.name.clone(), Arc::new(updated));
        drop(topics);
        self.generation.send_modify(|g| *g += 1);
    }

    pub(crate) fn remove(&self, name: &str) {
        self.topics
            .write()
            .expect("catalog lock poisoned")
            .remove(name);
        self.generation.send_modify(|g| *g += 1);
    }
}
