//! Topics as the Raft driver sees them: choosing replicas for a new topic,
//! opening the groups of the partitions this node replicates, and removing
//! them again.

use covet_protocol::api::TopicConfig;
use covet_protocol::internal::{Replicas, TopicRecord};

use crate::catalog::{LocalReplica, PartitionHandle, TopicHandle};
use crate::driver::{open_group_in, Driver, META_GROUP};
use crate::error::{BrokerError, Result};
use crate::faults::guard;
use crate::group::{Bootstrap, Group, Machine, Responder};
use crate::state::meta::create_topic_command;
use crate::state::partition::{offsets_path, PartitionState};

/// Replicas per partition when a topic does not say.
const DEFAULT_REPLICATION_FACTOR: u32 = 3;

impl Driver {
    /// The metadata group's voters: the nodes replicas can be placed on.
    fn cluster_nodes(&self) -> Vec<u64> {
        let mut nodes = self
            .groups
            .get(&META_GROUP)
            .map(|g| g.voters())
            .unwrap_or_default();
        nodes.sort_unstable();
        nodes
    }

    /// Chooses replicas and proposes the topic. Only the metadata leader
    /// gets this far with success: a follower's proposal is refused with
    /// NOT_LEADER by the group.
    pub(crate) fn propose_create_topic(
        &mut self,
        name: String,
        mut config: TopicConfig,
        tx: Responder,
    ) {
        let nodes = self.cluster_nodes();
        let rf = match config.replication_factor {
            0 => DEFAULT_REPLICATION_FACTOR.min(nodes.len() as u32),
            rf => rf,
        };
        if rf as usize > nodes.len() || rf == 0 {
            let _ = tx.send(Err(BrokerError::InvalidConfig(format!(
                "replication factor {rf} needs {rf} nodes; the cluster has {}",
                nodes.len()
            ))));
            return;
        }
        config.replication_factor = rf;
        let assignments = assign(&nodes, config.partitions, rf, self.catalog.topics().len());
        let data = create_topic_command(name, config, crate::now_ms(), assignments);
        self.propose_meta(data, tx);
    }

    /// Opens the groups of the partitions this node replicates and
    /// publishes the topics. The groups are opened on up to
    /// [`OPEN_THREADS`] threads: opening a group reads its last segment,
    /// and a node restarting with many partitions would otherwise read them
    /// one after another (about 100 ms each for a full 64 MiB segment with a
    /// cold page cache).
    pub(crate) fn open_topics(&mut self, records: Vec<TopicRecord>) -> Result<()> {
        let me = self.config.node_id;
        // Every local partition's applied state, opened here (sled), and
        // what its group needs to open.
        let mut planned = Vec::new();
        for (t, record) in records.iter().enumerate() {
            for (p, &gid) in record.groups.iter().enumerate() {
                let replicas = replicas_of(record, p, me);
                if !replicas.contains(&me) {
                    continue;
                }
                let state = PartitionState::open(
                    self.db.open_tree(format!("p{gid}"))?,
                    offsets_path(&self.group_dir(gid)),
                )?;
                let local = (state.index(), state.subscribe(), state.group_view());
                let bootstrap = Bootstrap {
                    preferred_leader: replicas[0],
                    voters: replicas,
                };
                planned.push(((t, p), gid, Some(state), bootstrap, local));
            }
        }
        let mut opened: std::collections::HashMap<
            (usize, usize),
            std::result::Result<Group, String>,
        > = Default::default();
        let per_thread = planned.len().div_ceil(OPEN_THREADS).max(1);
        let (config, logger) = (&self.config, &self.logger);
        std::thread::scope(|scope| {
            let workers: Vec<_> = planned
                .chunks_mut(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter_mut()
                            .filter_map(|(at, gid, state, bootstrap, _)| {
                                let machine = Machine::Partition(state.take()?);
                                let group = guard(|| {
                                    open_group_in(config, logger, *gid, machine, bootstrap)
                                });
                                Some((*at, group))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for w in workers {
                match w.join() {
                    Ok(groups) => opened.extend(groups),
                    Err(_) => {
                        tracing::error!("a thread opening groups panicked");
                    }
                }
            }
        });
        let mut locals: std::collections::HashMap<(usize, usize), _> = planned
            .into_iter()
            .map(|(at, _, _, _, local)| (at, local))
            .collect();
        for (t, record) in records.into_iter().enumerate() {
            let config = record.config.unwrap_or_default();
            let mut partitions = Vec::with_capacity(record.groups.len());
            for (p, &gid) in record.groups.iter().enumerate() {
                let replicas = replicas_of(&record, p, me);
                let mut handle = PartitionHandle {
                    partition: p as u32,
                    group: gid,
                    replicas,
                    local: None,
                };
                let Some((index, progress, groups)) = locals.remove(&(t, p)) else {
                    partitions.push(handle);
                    continue;
                };
                let group = match opened.remove(&(t, p)) {
                    Some(Ok(g)) => g,
                    // One unreadable log takes its replica out of service,
                    // not the node (see `crate::faults`).
                    Some(Err(reason)) => {
                        handle.local = self.rebuild_unopened(gid, reason);
                        if handle.local.is_some() {
                            self.retention
                                .insert(gid, (config.retention_ms, config.retention_bytes));
                        }
                        partitions.push(handle);
                        continue;
                    }
                    None => {
                        let reason = "its opening thread failed".to_string();
                        handle.local = self.rebuild_unopened(gid, reason);
                        partitions.push(handle);
                        continue;
                    }
                };
                handle.local = Some(LocalReplica {
                    storage: group.storage.clone(),
                    index,
                    progress,
                    leader: group.leader.subscribe(),
                    groups,
                });
                self.retention
                    .insert(gid, (config.retention_ms, config.retention_bytes));
                self.groups.insert(gid, group);
                partitions.push(handle);
            }
            self.catalog.insert(TopicHandle { record, partitions });
        }
        Ok(())
    }

    /// Withdraws a topic and destroys its partitions' logs and state.
    pub(crate) fn drop_topic(&mut self, record: &TopicRecord) -> Result<()> {
        self.catalog.remove(&record.name);
        // The deletion must be in sled before the logs go: a restart that
        // found the topic in sled but its logs gone could not rebuild it.
        self.db.flush()?;
        for &gid in &record.groups {
            if let Some(mut g) = self.groups.remove(&gid) {
                g.fail_all(BrokerError::UnknownTopic(record.name.clone()));
            }
            self.retention.remove(&gid);
            covet_raft_store::destroy(&self.group_dir(gid))?;
            self.db.drop_tree(format!("p{gid}"))?;
        }
        Ok(())
    }
}

/// Places `rf` replicas of each of `partitions` partitions on `nodes`,
/// round-robin from a rotating start so that preferred leaders (the first
/// replica) spread evenly over nodes and over topics.
/// Threads opening partition groups at once at startup.
const OPEN_THREADS: usize = 8;

/// The replicas of partition `p` of `record` (topics from before
/// assignments existed live on node `me`).
fn replicas_of(record: &TopicRecord, p: usize, me: u64) -> Vec<u64> {
    record
        .assignments
        .get(p)
        .map(|r| r.nodes.clone())
        .unwrap_or_else(|| vec![me])
}

pub fn assign(nodes: &[u64], partitions: u32, rf: u32, salt: usize) -> Vec<Replicas> {
    (0..partitions as usize)
        .map(|p| Replicas {
            nodes: (0..rf as usize)
                .map(|r| nodes[(salt + p + r) % nodes.len()])
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::assign;

    #[test]
    fn leaders_spread_and_replicas_are_distinct() {
        let a = assign(&[1, 2, 3], 6, 3, 0);
        let leaders: Vec<u64> = a.iter().map(|r| r.nodes[0]).collect();
        assert_eq!(leaders, vec![1, 2, 3, 1, 2, 3]);
        for r in &a {
            let mut n = r.nodes.clone();
            n.sort_unstable();
            n.dedup();
            assert_eq!(n.len(), 3);
        }
        let b = assign(&[1, 2, 3], 1, 2, 1);
        assert_eq!(b[0].nodes, vec![2, 3]);
    }
}
