//! The metadata state machine (Raft group 0): topics and the Raft groups of
//! their partitions.
//!
//! sled layout (tree `meta`): `s` → applied index ‖ next group id (u64 LE
//! each); `t/<name>` → `TopicRecord` (protobuf); `c/<name>` → a consumer
//! group's `ConsumerGroupRecord` (protobuf), as its coordinator last
//! recorded it (see [`crate::consumer::coordinator`]). Group ids are handed out
//! from a counter that never goes back, so a topic deleted and created again
//! never reuses a partition's directory or sled tree.

use std::collections::BTreeMap;
use std::sync::Arc;

use covet_protocol::api::TopicConfig;
use covet_protocol::internal::{
    meta_command, AllocateProducerId, ConsumerGroupRecord, CreateTopic, DeleteConsumerGroup,
    DeleteTopic, MetaCommand, Replicas, TopicRecord,
};
use prost::Message as _;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};

const STATE_KEY: &[u8] = b"s";
/// Most partitions the cluster holds, over all topics.
pub const MAX_NODE_PARTITIONS: u64 = 8192;
const TOPIC_PREFIX: &[u8] = b"t/";
const CONSUMER_GROUP_PREFIX: &[u8] = b"c/";

/// Consumer groups' membership records, by name, as applied.
pub type ConsumerGroups = Arc<BTreeMap<String, ConsumerGroupRecord>>;

/// What applying a metadata command changed, for the driver to act on.
#[derive(Debug, Clone)]
pub enum MetaEffect {
    TopicCreated(TopicRecord),
    TopicDeleted(TopicRecord),
    /// A producer id, unique in the cluster.
    ProducerId(i64),
    /// A consumer group's membership record was set or deleted.
    ConsumerGroup,
}

/// Topics as of the applied index.
pub struct MetaState {
    tree: sled::Tree,
    applied: u64,
    next_group: u64,
    next_producer_id: i64,
    topics: BTreeMap<String, TopicRecord>,
    /// Where the allocation mark is shown to request handlers (the
    /// catalog), if anyone listens.
    producer_ids: Option<Arc<watch::Sender<i64>>>,
    consumer_groups: BTreeMap<String, ConsumerGroupRecord>,
    /// Where the consumer groups are shown to the coordinator.
    consumer_groups_view: Option<Arc<watch::Sender<ConsumerGroups>>>,
}

impl MetaState {
    pub fn open(tree: sled::Tree) -> Result<Self> {
        let (applied, next_group, next_producer_id) = match tree.get(STATE_KEY)? {
            Some(v) => decode_state(&v)
                .ok_or_else(|| BrokerError::Storage("corrupt metadata state in sled".into()))?,
            None => (0, 1, 0),
        };
        let mut topics = BTreeMap::new();
        for item in tree.scan_prefix(TOPIC_PREFIX) {
            let (_, v) = item?;
            let t = TopicRecord::decode(&v[..])
                .map_err(|e| BrokerError::Storage(format!("corrupt topic record in sled: {e}")))?;
            topics.insert(t.name.clone(), t);
        }
        let mut consumer_groups = BTreeMap::new();
        for item in tree.scan_prefix(CONSUMER_GROUP_PREFIX) {
            let (_, v) = item?;
            let g = ConsumerGroupRecord::decode(&v[..]).map_err(|e| {
                BrokerError::Storage(format!("corrupt consumer group record in sled: {e}"))
            })?;
            consumer_groups.insert(g.name.clone(), g);
        }
        Ok(MetaState {
            tree,
            applied,
            next_group,
            next_producer_id,
            topics,
            producer_ids: None,
            consumer_groups,
            consumer_groups_view: None,
        })
    }

    /// The next producer id to be allocated: every id below it was.
    pub fn next_producer_id(&self) -> i64 {
        self.next_producer_id
    }

    /// Shows the producer id allocation mark on `to` from now on (the
    /// catalog's, see [`crate::catalog::Catalog::check_producer`]).
    pub fn publish_producer_ids(&mut self, to: Arc<watch::Sender<i64>>) {
        to.send_replace(self.next_producer_id);
        self.producer_ids = Some(to);
    }

    /// Shows the consumer groups' records on `to` from now on (the
    /// catalog's, which the coordinator reads).
    pub fn publish_consumer_groups(&mut self, to: Arc<watch::Sender<ConsumerGroups>>) {
        to.send_replace(Arc::new(self.consumer_groups.clone()));
        self.consumer_groups_view = Some(to);
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicRecord> {
        self.topics.values()
    }

    pub fn topic(&self, name: &str) -> Option<&TopicRecord> {
        self.topics.get(name)
    }

    /// Records that `index` was applied without a command (empty entries).
    pub fn mark_applied(&mut self, index: u64) -> Result<()> {
        self.applied = index;
        self.tree.insert(STATE_KEY, &self.state_bytes()[..])?;
        Ok(())
    }

    fn state_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.applied.to_le_bytes());
        b[8..16].copy_from_slice(&self.next_group.to_le_bytes());
        b[16..24].copy_from_slice(&self.next_producer_id.to_le_bytes());
        b
    }

    /// Applies the committed command at `index`. An error is the command's
    /// outcome (e.g. the topic already exists), identical on every replica;
    /// the index is applied either way.
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Result<MetaEffect> {
        self.applied = index;
        let outcome = match MetaCommand::decode(data).ok().and_then(|c| c.kind) {
            Some(meta_command::Kind::CreateTopic(c)) => self.create_topic(c),
            Some(meta_command::Kind::DeleteTopic(d)) => self.delete_topic(d),
            Some(meta_command::Kind::AllocateProducerId(_)) => {
                let id = self.next_producer_id;
                self.next_producer_id += 1;
                if let Some(to) = &self.producer_ids {
                    to.send_replace(self.next_producer_id);
                }
                Ok(MetaEffect::ProducerId(id))
            }
            Some(meta_command::Kind::SetConsumerGroup(g)) => {
                self.consumer_groups.insert(g.name.clone(), g);
                Ok(MetaEffect::ConsumerGroup)
            }
            Some(meta_command::Kind::DeleteConsumerGroup(d)) => {
                self.consumer_groups.remove(&d.name);
                Ok(MetaEffect::ConsumerGroup)
            }
            None => Err(BrokerError::Internal(format!(
                "undecodable metadata entry at {index}"
            ))),
        };
        let mut batch = sled::Batch::default();
        match &outcome {
            Ok(MetaEffect::TopicCreated(t)) => batch.insert(topic_key(&t.name), t.encode_to_vec()),
            Ok(MetaEffect::TopicDeleted(t)) => batch.remove(topic_key(&t.name)),
            Ok(MetaEffect::ConsumerGroup) => {
                // Which group changed is in the command; write them all
                // back would be wasteful: find it again.
                if let Some(name) = consumer_group_named(data) {
                    match self.consumer_groups.get(&name) {
                        Some(g) => batch.insert(consumer_group_key(&name), g.encode_to_vec()),
                        None => batch.remove(consumer_group_key(&name)),
                    }
                }
                if let Some(to) = &self.consumer_groups_view {
                    to.send_replace(Arc::new(self.consumer_groups.clone()));
                }
            }
            Ok(MetaEffect::ProducerId(_)) | Err(_) => {}
        }
        batch.insert(STATE_KEY, &self.state_bytes()[..]);
        self.tree.apply_batch(batch)?;
        outcome
    }

    fn create_topic(&mut self, c: CreateTopic) -> Result<MetaEffect> {
        if self.topics.contains_key(&c.name) {
            return Err(BrokerError::TopicExists(c.name));
        }
        let config: TopicConfig = c.config.unwrap_or_default();
        let n = u64::from(config.partitions);
        let existing: u64 = self.topics.values().map(|t| t.groups.len() as u64).sum();
        if existing + n > MAX_NODE_PARTITIONS {
            // Decided here, at apply, so every replica agrees; each
            // partition holds open files and a sled tree.
            return Err(BrokerError::InvalidConfig(format!(
                "{n} more partitions would exceed the cluster's limit of {MAX_NODE_PARTITIONS} (now {existing})"
            )));
        }
        let groups = (self.next_group..self.next_group + n).collect();
        self.next_group += n;
        if !c.assignments.is_empty() && c.assignments.len() as u64 != n {
            return Err(BrokerError::InvalidConfig(format!(
                "{} replica assignments for {n} partitions",
                c.assignments.len()
            )));
        }
        let record = TopicRecord {
            name: c.name.clone(),
            config: Some(config),
            groups,
            created_ms: c.created_ms,
            assignments: c.assignments,
        };
        self.topics.insert(c.name, record.clone());
        Ok(MetaEffect::TopicCreated(record))
    }

    fn delete_topic(&mut self, d: DeleteTopic) -> Result<MetaEffect> {
        match self.topics.remove(&d.name) {
            Some(t) => Ok(MetaEffect::TopicDeleted(t)),
            None => Err(BrokerError::UnknownTopic(d.name)),
        }
    }
}

fn consumer_group_key(name: &str) -> Vec<u8> {
    let mut k = CONSUMER_GROUP_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// The consumer group a set/delete command is about.
fn consumer_group_named(data: &[u8]) -> Option<String> {
    match MetaCommand::decode(data).ok()?.kind? {
        meta_command::Kind::SetConsumerGroup(g) => Some(g.name),
        meta_command::Kind::DeleteConsumerGroup(d) => Some(d.name),
        _ => None,
    }
}

/// Encodes a consumer group's membership record for proposal.
pub fn set_consumer_group_command(record: ConsumerGroupRecord) -> Vec<u8> {
    MetaCommand {
        kind: Some(meta_command::Kind::SetConsumerGroup(record)),
    }
    .encode_to_vec()
}

/// Encodes the removal of a consumer group's membership record.
pub fn delete_consumer_group_command(name: String) -> Vec<u8> {
    MetaCommand {
        kind: Some(meta_command::Kind::DeleteConsumerGroup(
            DeleteConsumerGroup { name },
        )),
    }
    .encode_to_vec()
}

fn topic_key(name: &str) -> Vec<u8> {
    let mut k = TOPIC_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// Encodes a create-topic command for proposal.
pub fn create_topic_command(
    name: String,
    config: TopicConfig,
    created_ms: i64,
    assignments: Vec<Replicas>,
) -> Vec<u8> {
    MetaCommand {
        kind: Some(meta_command::Kind::CreateTopic(CreateTopic {
            name,
            config: Some(config),
            created_ms,
            assignments,
        })),
    }
    .encode_to_vec()
}

/// Encodes a request for a new producer id.
pub fn allocate_producer_id_command() -> Vec<u8> {
    MetaCommand {
        kind: Some(meta_command::Kind::AllocateProducerId(
            AllocateProducerId {},
        )),
    }
    .encode_to_vec()
}

/// Reads the `s` value: applied index, next group id and (since producer
/// ids exist) next producer id.
fn decode_state(v: &[u8]) -> Option<(u64, u64, i64)> {
    let u = |i: usize| -> Option<[u8; 8]> { v.get(i..i + 8)?.try_into().ok() };
    let producer = match v.len() {
        16 => 0,
        24 => i64::from_le_bytes(u(16)?),
        _ => return None,
    };
    Some((
        u64::from_le_bytes(u(0)?),
        u64::from_le_bytes(u(8)?),
        producer,
    ))
}

/// Encodes a delete-topic command for proposal.
pub fn delete_topic_command(name: String) -> Vec<u8> {
    MetaCommand {
        kind: Some(meta_command::Kind::DeleteTopic(DeleteTopic { name })),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (sled::Tree, MetaState) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("meta").unwrap();
        (tree.clone(), MetaState::open(tree).unwrap())
    }

    fn config(partitions: u32) -> TopicConfig {
        TopicConfig {
            partitions,
            replication_factor: 1,
            max_batch_bytes: 1024,
            ..Default::default()
        }
    }

    #[test]
    fn topics_get_fresh_groups_and_survive_reopen() {
        let (tree, mut m) = state();
        let a = m
            .apply(1, &create_topic_command("a".into(), config(2), 5, vec![]))
            .unwrap();
        assert!(matches!(a, MetaEffect::TopicCreated(ref t) if t.groups == vec![1, 2]));
        let dup = m.apply(2, &create_topic_command("a".into(), config(1), 6, vec![]));
        assert!(matches!(dup, Err(BrokerError::TopicExists(_))));
        m.apply(3, &delete_topic_command("a".into())).unwrap();
        // A new topic of the same name never reuses a group id.
        let b = m
            .apply(4, &create_topic_command("a".into(), config(1), 7, vec![]))
            .unwrap();
        assert!(matches!(b, MetaEffect::TopicCreated(ref t) if t.groups == vec![3]));
        let again = MetaState::open(tree).unwrap();
        assert_eq!(again.applied(), 4);
        assert_eq!(again.topic("a").map(|t| t.groups.clone()), Some(vec![3]));
    }

    #[test]
    fn unknown_deletes_and_partition_limit_are_refused_deterministically() {
        let (_, mut m) = state();
        assert!(matches!(
            m.apply(1, &delete_topic_command("x".into())),
            Err(BrokerError::UnknownTopic(_))
        ));
        let big = config(MAX_NODE_PARTITIONS as u32);
        m.apply(2, &create_topic_command("big".into(), big, 0, vec![]))
            .unwrap();
        assert!(matches!(
            m.apply(
                3,
                &create_topic_command("one-more".into(), config(1), 0, vec![])
            ),
            Err(BrokerError::InvalidConfig(_))
        ));
        assert!(matches!(
            m.apply(4, b"\xff\xff not a command"),
            Err(BrokerError::Internal(_))
        ));
        assert_eq!(m.applied(), 4);
    }
}
