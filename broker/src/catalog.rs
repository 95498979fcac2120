//! What the request handlers can see of the node's state without asking the
//! Raft driver: topics, and for each partition its storage (to read
//! committed entries), offset index and progress.
//!
//! The driver is the only writer: it publishes a topic after creating its
//! partitions' groups and withdraws it before destroying them. Handlers take
//! the read lock just long enough to clone an `Arc`.
//!
//! It also shows how far the metadata group has allocated producer ids
//! (as this node has applied it), so a produce with an id the cluster never
//! handed out is refused before it is proposed
//! ([`Catalog::check_producer`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

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
    /// Consumer groups' committed offsets and delivery counts, as applied.
    pub groups: crate::state::groups::GroupView,
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

/// How long a produce waits for this node's metadata to show its producer
/// id allocated before it is refused: long enough for a replica of the
/// metadata group that lags its leader by a few rounds to catch up.
pub const PRODUCER_ID_WAIT: Duration = Duration::from_secs(2);

/// The topics this node serves.
pub struct Catalog {
    topics: RwLock<BTreeMap<String, Arc<TopicHandle>>>,
    /// Bumped on every change, so handlers can wait for a topic to appear
    /// or go without polling.
    generation: watch::Sender<u64>,
    /// The next producer id the metadata group will allocate, as this node
    /// has applied it: every id below has been handed out.
    producer_ids: Arc<watch::Sender<i64>>,
    /// The metadata group's leader and term as this node last heard, set
    /// once when the driver opens group 0 (which is never rebuilt).
    meta_leader: std::sync::OnceLock<watch::Receiver<(u64, u64)>>,
    /// Consumer groups' membership records as the metadata group applied
    /// them (for the coordinator).
    consumer_groups: Arc<watch::Sender<crate::state::meta::ConsumerGroups>>,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            topics: RwLock::default(),
            generation: watch::channel(0).0,
            producer_ids: Arc::new(watch::channel(0).0),
            meta_leader: std::sync::OnceLock::new(),
            consumer_groups: Arc::new(watch::channel(Arc::default()).0),
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

    /// The metadata leader and its term, (0, 0) if unknown: read from a
    /// watch, with no call to the driver thread.
    pub fn meta_leader(&self) -> (u64, u64) {
        self.meta_leader.get().map_or((0, 0), |rx| *rx.borrow())
    }

    pub(crate) fn set_meta_leader(&self, leader: watch::Receiver<(u64, u64)>) {
        let _ = self.meta_leader.set(leader);
    }

    /// Where the metadata state machine publishes consumer groups.
    pub(crate) fn consumer_groups_sender(
        &self,
    ) -> Arc<watch::Sender<crate::state::meta::ConsumerGroups>> {
        self.consumer_groups.clone()
    }

    /// Consumer groups' membership records as this node applied them.
    pub fn consumer_groups(&self) -> crate::state::meta::ConsumerGroups {
        self.consumer_groups.borrow().clone()
    }

    /// A receiver that sees every change to the catalog.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Where the metadata state machine publishes its producer id
    /// allocation mark ([`crate::state::meta::MetaState::publish_producer_ids`]).
    pub(crate) fn producer_ids(&self) -> Arc<watch::Sender<i64>> {
        self.producer_ids.clone()
    }

    /// Refuses a batch whose producer id the cluster never allocated
    /// (`UNKNOWN_PRODUCER_ID`). Batches without a producer id (negative)
    /// pass. The check is made on the node handling the produce, against
    /// the allocations its replica of the metadata group has applied; that
    /// replica may lag the metadata leader that just handed the id out, so
    /// an id not yet seen is waited for, up to `wait`, before it is
    /// refused. The refusal is retriable for the same reason.
    pub async fn check_producer(&self, batch: &[u8], wait: Duration) -> Result<()> {
        let Ok(h) = covet_protocol::batch::read_header(batch) else {
            return Ok(()); // validation refuses it with the reason why
        };
        let id = h.producer_id;
        if id < 0 || id < *self.producer_ids.borrow() {
            return Ok(());
        }
        let mut rx = self.producer_ids.subscribe();
        let seen = tokio::time::timeout(wait, rx.wait_for(|&next| id < next))
            .await
            .is_ok_and(|r| r.is_ok());
        if seen {
            return Ok(());
        }
        Err(BrokerError::UnknownProducerId {
            producer_id: id,
            allocated: *self.producer_ids.borrow(),
        })
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
