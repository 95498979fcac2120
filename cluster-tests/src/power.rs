//! Power cuts: each node's data dir on a power-loss filesystem
//! ([`covet_powerfs`]), and the check that a node cut off never vouched
//! for anything it had not synced.
//!
//! [`Cluster::start_powered`] mounts a [`PowerFs`] at every node's data dir
//! (`node<i>/data`, backed by `node<i>/disk`; the node's logs stay outside
//! it). [`Cluster::power_cut`] SIGKILLs the nodes and then cuts their
//! filesystems: every write not covered by an `fsync`/`fdatasync`, and
//! every directory entry not covered by a directory fsync, is gone, the
//! last unsynced write of each file torn at a random byte when asked. The
//! filesystem is then mounted again on what survived, ready for
//! [`Cluster::restart`].
//!
//! **Vouching.** A node that acknowledged an append, or granted a vote,
//! from state it had not synced would break Raft after a power cut: the
//! entry it counted toward a commit, or the vote it gave, would be gone.
//! [`Witness`] polls every node's own view (`cluster status`, asked of
//! that node) and keeps, per node and group, the synced term and vote and
//! the highest index the replica acknowledged to a leader in that term.
//! After a restart, each group's `recovered raft state` line in the node's
//! log must show at least as much ([`Witness::check_recovery`]): the same
//! or a later term; in the same term, the same vote and a log reaching the
//! acknowledged index. Values observed before the cut are true facts about
//! what the node had said; the check cannot see what it said between the
//! last poll and the cut, so it is a lower bound, polled often.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use covet_powerfs::{CutOptions, CutStats, MountOptions, PowerFs};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::ClusterStatusRequest;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, NodeId, CALL_TIMEOUT};

/// How often the witness asks each node.
const WITNESS_INTERVAL: Duration = Duration::from_millis(50);

impl Cluster {
    /// Like [`Cluster::start_with`], with every node's data dir on a
    /// power-loss filesystem.
    pub async fn start_powered(n: usize, extra: &[&str]) -> anyhow::Result<Cluster> {
        let mut cluster = Self::prepare(n, extra).await?;
        for id in cluster.node_ids() {
            cluster.mount(id)?;
        }
        cluster.restart_many(&cluster.node_ids()).await?;
        Ok(cluster)
    }

    fn mount(&mut self, id: NodeId) -> anyhow::Result<()> {
        let spec = self.spec(id)?;
        let mountpoint = spec.data_dir();
        let backing = spec.dir.join("disk");
        std::fs::create_dir_all(&mountpoint)?;
        std::fs::create_dir_all(&backing)?;
        // The host itself keeps power: its own fsyncs would only slow the
        // test. What the node synced is what the cut keeps either way.
        let opts = MountOptions {
            sync_backing: false,
        };
        let fs = PowerFs::mount(&backing, &mountpoint, opts)
            .with_context(|| format!("mounting node {id}'s power-loss filesystem"))?;
        self.disks.insert(id, fs);
        Ok(())
    }

    /// Cuts the power of `ids` at once: SIGKILL, then every unsynced
    /// directory entry is lost, and every unsynced write too — unless the
    /// seed picks one of the other faults: the unsynced writes of a file
    /// land in order with the last one torn, or a random subset of them
    /// lands (a later write without an earlier one), its last torn. Then
    /// the filesystems are mounted again on what survived. The nodes stay
    /// down until [`Cluster::restart_many`]. Fails if a cut could not
    /// restore the synced state exactly.
    pub async fn power_cut(
        &mut self,
        ids: &[NodeId],
        seed: u64,
    ) -> anyhow::Result<Vec<(NodeId, CutStats)>> {
        self.kill9_many(ids).await?;
        let mut out = Vec::new();
        for &id in ids {
            let fs = self
                .disks
                .remove(&id)
                .ok_or_else(|| anyhow!("node {id} has no power-loss filesystem"))?;
            let seed = seed ^ id;
            let opts = CutOptions {
                seed,
                tear: seed % 3 != 0,
                reorder: seed % 3 == 2,
            };
            let stats = tokio::task::spawn_blocking(move || {
                let stats = fs.power_cut(opts);
                drop(fs);
                stats
            })
            .await??;
            if !stats.errors.is_empty() {
                bail!("power cut of node {id} left errors: {:?}", stats.errors);
            }
            self.mount(id)?;
            out.push((id, stats));
        }
        Ok(out)
    }
}

/// What one replica said, as last observed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vouched {
    pub term: u64,
    pub vote: u64,
    /// Highest index acknowledged to a leader in `term`.
    pub acked: u64,
}

/// Polls every node's own status; see the module docs.
pub struct Witness {
    seen: Arc<Mutex<BTreeMap<(NodeId, u64), Vouched>>>,
    task: JoinHandle<()>,
}

impl Witness {
    /// Starts polling the nodes at these client addresses.
    pub fn start(nodes: Vec<(NodeId, String)>) -> Witness {
        let seen: Arc<Mutex<BTreeMap<(NodeId, u64), Vouched>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(WITNESS_INTERVAL);
            loop {
                tick.tick().await;
                for (id, addr) in &nodes {
                    if let Ok(groups) = ask(addr).await {
                        let mut seen = record.lock().expect("witness lock");
                        for g in groups {
                            let now = Vouched {
                                term: g.0,
                                vote: g.1,
                                acked: g.2,
                            };
                            let slot = seen.entry((*id, g.3)).or_default();
                            if (now.term, now.acked) >= (slot.term, slot.acked) {
                                *slot = now;
                            }
                        }
                    }
                }
            }
        });
        Witness { seen, task }
    }

    /// What `node` had said of each group, as last observed.
    pub fn of(&self, node: NodeId) -> BTreeMap<u64, Vouched> {
        self.seen
            .lock()
            .expect("witness lock")
            .iter()
            .filter(|((n, _), _)| *n == node)
            .map(|((_, g), v)| (*g, *v))
            .collect()
    }

    /// Forgets what `node` said (before a restart: the new process starts
    /// its own record).
    pub fn forget(&self, node: NodeId) {
        self.seen
            .lock()
            .expect("witness lock")
            .retain(|(n, _), _| *n != node);
    }

    /// Checks `node`'s last start against what it had said before (`before`,
    /// taken with [`Witness::of`] before the cut): every problem found.
    pub fn check_recovery(
        cluster: &Cluster,
        node: NodeId,
        before: &BTreeMap<u64, Vouched>,
    ) -> anyhow::Result<Vec<String>> {
        let log = std::fs::read_to_string(cluster.stderr_log(node)?)?;
        let marker = format!("=== cluster-tests: starting node {node} ===");
        let last_start = log.rfind(&marker).map_or(0, |i| i + marker.len());
        let recovered = parse_recovered(&log[last_start..]);
        let mut problems = Vec::new();
        for (group, said) in before {
            if said.term == 0 {
                continue;
            }
            let Some(r) = recovered.get(group) else {
                // A group the node no longer holds (deleted, or never
                // opened again) vouches for nothing now.
                continue;
            };
            if r.term < said.term {
                problems.push(format!(
                    "node {node} group {group}: restarted at term {} after having synced term {}",
                    r.term, said.term
                ));
            } else if r.term == said.term {
                if said.vote != 0 && r.vote != said.vote {
                    problems.push(format!(
                        "node {node} group {group}: voted for {} in term {}, restarted with vote {}",
                        said.vote, said.term, r.vote
                    ));
                }
                if r.last_index < said.acked {
                    problems.push(format!(
                        "node {node} group {group}: acknowledged index {} in term {}, restarted \
                         with its log ending at {}",
                        said.acked, said.term, r.last_index
                    ));
                }
            }
        }
        if recovered.is_empty() {
            problems.push(format!(
                "node {node}: no `recovered raft state` lines after its restart"
            ));
        }
        Ok(problems)
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// (persisted term, persisted vote, acked, group) of each group, asked of
/// one node.
async fn ask(addr: &str) -> anyhow::Result<Vec<(u64, u64, u64, u64)>> {
    let call = async {
        let mut rpc = CovetClient::connect(format!("http://{addr}")).await?;
        let status = rpc.cluster_status(ClusterStatusRequest {}).await?;
        anyhow::Ok(
            status
                .into_inner()
                .groups
                .iter()
                .filter(|g| g.role != "faulted")
                .map(|g| (g.persisted_term, g.persisted_vote, g.acked, g.group))
                .collect(),
        )
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

/// A group's state as a node recovered it at start.
#[derive(Debug, Clone, Copy, Default)]
struct Recovered {
    term: u64,
    vote: u64,
    last_index: u64,
}

/// The `recovered raft state` lines of one run of a node's log.
fn parse_recovered(log: &str) -> BTreeMap<u64, Recovered> {
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("recovered raft state")) {
        if let (Some(group), Some(term), Some(vote), Some(last_index)) = (
            field(line, "group"),
            field(line, "term"),
            field(line, "vote"),
            field(line, "last_index"),
        ) {
            // A group rebuilt or reopened later in the run: the first
            // recovery is the one that followed the cut.
            out.entry(group).or_insert(Recovered {
                term,
                vote,
                last_index,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recovery_lines() {
        let log = "2026 INFO covet_broker::group: recovered raft state group=3 term=7 vote=2 \
                   commit=40 last_index=44 applied=40\nother line\n";
        let r = parse_recovered(log);
        assert_eq!(r.len(), 1);
        assert_eq!((r[&3].term, r[&3].vote, r[&3].last_index), (7, 2, 44));
    }
}
