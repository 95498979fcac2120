//! A cluster of real `covet broker` processes on loopback, with a
//! fault-injecting [`Proxy`] on every directed link between two nodes.
//!
//! Topology for nodes 1..=n: node `i` binds its client port and its peer
//! port; for every other node `j` a proxy P(i→j) listens on a port of its
//! own and forwards to `j`'s peer port, and node `i`'s `--peers` entry for
//! `j` names that proxy. So all Raft traffic a node sends travels on
//! connections it dialed through its own outgoing proxies, and a test cuts
//! one direction of a link by dropping one proxy. Clients talk to the nodes'
//! client ports directly (no proxy).
//!
//! The harness never sleeps to synchronise: starts and restarts wait for
//! each node's `ready` line with a deadline, and leader changes are awaited
//! by polling with a deadline ([`crate::wait_until`]).
//!
//! On drop every process is killed. When dropped during a panic (a failed
//! test), it prints the last lines of every node's log and keeps the
//! cluster's directory, printing where it is. `COVET_KEEP_CLUSTER=1` keeps
//! it always; `COVET_CLUSTER_LOG` sets the nodes' `--log-level` (default
//! `info`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{MetadataRequest, MetadataResponse};
use tempfile::TempDir;

use crate::bin_path::covet_bin;
use crate::node::{self, log_tail, NodeSpec, Running, READY_TIMEOUT};
use crate::proxy::{Mode, Proxy};

pub use crate::node::NodeId;

/// Bound on one client call the harness makes (describe, status).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A running test cluster; see the module docs.
pub struct Cluster {
    root: Option<TempDir>,
    bin: PathBuf,
    specs: Vec<NodeSpec>,
    procs: Vec<Option<Running>>,
    links: BTreeMap<(NodeId, NodeId), Proxy>,
    /// Nodes that exited without the test asking them to, with how.
    crashes: Vec<(NodeId, String)>,
    /// Each node's power-loss filesystem under its data dir, when started
    /// with [`Cluster::start_powered`] (see [`crate::power`]).
    pub(crate) disks: BTreeMap<NodeId, covet_powerfs::PowerFs>,
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) and waits until every one is ready.
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(n, &[]).await
    }

    /// Like [`Cluster::start`], passing `extra` flags to every node.
    pub async fn start_with(n: usize, extra: &[&str]) -> anyhow::Result<Cluster> {
        let mut cluster = Self::prepare(n, extra).await?;
        cluster.restart_many(&cluster.node_ids()).await?;
        Ok(cluster)
    }

    /// Everything but starting the nodes.
    pub(crate) async fn prepare(n: usize, extra: &[&str]) -> anyhow::Result<Cluster> {
        if n == 0 {
            bail!("a cluster needs at least one node");
        }
        let bin = tokio::task::spawn_blocking(covet_bin).await??;
        let root = tempfile::Builder::new()
            .prefix("covet-cluster-")
            .tempdir()?;
        let ids: Vec<NodeId> = (1..=n as NodeId).collect();
        let ports = node::free_ports(2 * n)?;
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let peer_addr: HashMap<NodeId, SocketAddr> = ids
            .iter()
            .map(|&i| (i, addr(ports[n + i as usize - 1])))
            .collect();
        let mut links = BTreeMap::new();
        for &from in &ids {
            for &to in ids.iter().filter(|&&to| to != from) {
                let proxy = Proxy::start(addr(0), peer_addr[&to]).await?;
                links.insert((from, to), proxy);
            }
        }
        let log_level = std::env::var("COVET_CLUSTER_LOG").unwrap_or_else(|_| "info".into());
        let specs = ids
            .iter()
            .map(|&id| NodeSpec {
                id,
                dir: root.path().join(format!("node{id}")),
                client_addr: addr(ports[id as usize - 1]),
                peer_addr: peer_addr[&id],
                peers: peers_arg(id, &ids, &peer_addr, &links),
                log_level: log_level.clone(),
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        Ok(Cluster {
            root: Some(root),
            bin,
            specs,
            procs: ids.iter().map(|_| None).collect(),
            links,
            crashes: Vec::new(),
            disks: BTreeMap::new(),
        })
    }

    /// Node ids, 1..=n.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.specs.iter().map(|s| s.id).collect()
    }

    /// Every node's client address, `h:p,h:p,...`, as a seed list.
    pub fn client_addrs(&self) -> String {
        let addrs: Vec<String> = self
            .specs
            .iter()
            .map(|s| s.client_addr.to_string())
            .collect();
        addrs.join(",")
    }

    /// One node's client address.
    pub fn client_addr(&self, id: NodeId) -> anyhow::Result<SocketAddr> {
        Ok(self.spec(id)?.client_addr)
    }

    /// One node's `--data-dir`.
    pub fn data_dir(&self, id: NodeId) -> anyhow::Result<PathBuf> {
        Ok(self.spec(id)?.data_dir())
    }

    /// The node's log file (appended across restarts, a marker per start).
    pub fn stderr_log(&self, id: NodeId) -> anyhow::Result<PathBuf> {
        Ok(self.spec(id)?.stderr_log())
    }

    /// The directory holding every node's directory.
    pub fn dir(&self) -> Option<&Path> {
        self.root.as_ref().map(TempDir::path)
    }

    /// Whether the node's process is running (paused counts as running).
    pub fn is_running(&self, id: NodeId) -> bool {
        self.index(id).is_ok_and(|i| self.procs[i].is_some())
    }

    /// Whether the node runs and is not stopped by SIGSTOP.
    pub fn is_responsive(&self, id: NodeId) -> bool {
        self.index(id)
            .is_ok_and(|i| self.procs[i].as_ref().is_some_and(|p| !p.paused))
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill9(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.kill9_many(&[id]).await
    }

    /// SIGKILL to every listed node before waiting for any, so they die
    /// together.
    pub async fn kill9_many(&mut self, ids: &[NodeId]) -> anyhow::Result<()> {
        let mut dying = Vec::new();
        for &id in ids {
            let mut p = self.take_running(id)?;
            p.child.start_kill()?;
            dying.push(p);
        }
        for p in dying {
            p.kill9().await?;
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes; its sockets stay open.
    pub async fn stop_signal(&mut self, id: NodeId) -> anyhow::Result<()> {
        let p = self.running_mut(id)?;
        p.signal("STOP").await?;
        p.paused = true;
        Ok(())
    }

    /// SIGCONT after [`Cluster::stop_signal`].
    pub async fn cont(&mut self, id: NodeId) -> anyhow::Result<()> {
        let p = self.running_mut(id)?;
        p.signal("CONT").await?;
        p.paused = false;
        Ok(())
    }

    /// SIGTERM (graceful shutdown), and waits for the exit status.
    pub async fn terminate(&mut self, id: NodeId) -> anyhow::Result<ExitStatus> {
        let p = self.take_running(id)?;
        p.terminate()
            .await
            .with_context(|| format!("terminating node {id}"))
    }

    /// Starts a stopped node again on its ports and data dir, and waits
    /// until it is ready.
    pub async fn restart(&mut self, id: NodeId) -> anyhow::Result<()> {
        self.restart_many(&[id]).await
    }

    /// Starts several stopped nodes at once, then waits for all: a node is
    /// ready only once its groups have leaders, which may need the others.
    pub async fn restart_many(&mut self, ids: &[NodeId]) -> anyhow::Result<()> {
        for &id in ids {
            let i = self.index(id)?;
            if self.procs[i].is_some() {
                bail!("node {id} is still running");
            }
            self.procs[i] = Some(Running::spawn(&self.bin, &self.specs[i])?);
        }
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        for &id in ids {
            let i = self.index(id)?;
            let spec = self.specs[i].clone();
            let p = self.procs[i].as_mut().context("node vanished")?;
            if let Err(e) = p.wait_ready(&spec, deadline).await {
                self.procs[i] = None;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes a stopped node's data dir.
    pub fn wipe(&mut self, id: NodeId) -> anyhow::Result<()> {
        if self.is_running(id) {
            bail!("node {id} must be stopped before its data dir is wiped");
        }
        node::remove_dir(&self.data_dir(id)?)
    }

    /// The proxy on the link `from` → `to` (traffic `from` sends to `to`).
    pub fn link(&self, from: NodeId, to: NodeId) -> anyhow::Result<&Proxy> {
        self.links
            .get(&(from, to))
            .ok_or_else(|| anyhow!("no link {from}→{to}"))
    }

    /// Cuts every link to and from `id`: it can neither reach nor be reached
    /// by the other nodes (clients can still reach it).
    pub fn partition(&self, id: NodeId) {
        for ((from, to), proxy) in &self.links {
            if *from == id || *to == id {
                proxy.set_mode(Mode::Drop);
            }
        }
    }

    /// Sets every link back to [`Mode::Pass`].
    pub fn heal(&self) {
        for proxy in self.links.values() {
            proxy.set_mode(Mode::Pass);
        }
    }

    /// The leader of a partition as a majority of all nodes sees it: each
    /// responsive node is asked for its own view ([`Cluster::node_metadata`]),
    /// and a leader named by more than half of the cluster's nodes is the
    /// answer. `None` while they disagree or name none (an isolated old
    /// leader still naming itself is outvoted).
    pub async fn leader_of(&self, topic: &str, partition: u32) -> anyhow::Result<Option<NodeId>> {
        let views = self.views().await;
        Ok(self.majority(
            views
                .iter()
                .filter_map(|m| partition_leader(m, topic, partition)),
        ))
    }

    /// The leader of the metadata group (group 0) as a majority of all
    /// nodes sees it; see [`Cluster::leader_of`].
    pub async fn metadata_leader(&self) -> anyhow::Result<Option<NodeId>> {
        let views = self.views().await;
        Ok(self.majority(views.iter().map(|m| m.controller).filter(|&c| c != 0)))
    }

    /// Polls [`Cluster::leader_of`] until it names a leader `accept`s.
    pub async fn wait_leader(
        &self,
        topic: &str,
        partition: u32,
        timeout: Duration,
        accept: impl Fn(NodeId) -> bool,
    ) -> anyhow::Result<NodeId> {
        let accept = &accept;
        crate::wait_until(timeout, || async move {
            self.leader_of(topic, partition)
                .await
                .ok()
                .flatten()
                .filter(|&l| accept(l))
        })
        .await
        .with_context(|| format!("waiting for a leader of {topic}/{partition}"))
    }

    /// The leader one node names for a partition (`None` if it names none).
    pub async fn node_view_of_leader(
        &self,
        id: NodeId,
        topic: &str,
        partition: u32,
    ) -> anyhow::Result<Option<NodeId>> {
        let meta = self.node_metadata(id).await?;
        Ok(partition_leader(&meta, topic, partition))
    }

    /// One node's own view of the cluster (its `Metadata` answer: nodes,
    /// topics with each partition's leader, and the metadata leader as
    /// `controller`), asked of that node alone and bounded by
    /// [`CALL_TIMEOUT`]. The harness's only direct RPC: `covet_client`
    /// routes calls to leaders, so it cannot ask a given node.
    pub async fn node_metadata(&self, id: NodeId) -> anyhow::Result<MetadataResponse> {
        let uri = format!("http://{}", self.client_addr(id)?);
        let ask = async {
            let mut rpc = CovetClient::connect(uri).await?;
            let meta = rpc.metadata(MetadataRequest { topics: vec![] }).await?;
            anyhow::Ok(meta.into_inner())
        };
        tokio::time::timeout(CALL_TIMEOUT, ask)
            .await
            .map_err(|_| anyhow!("node {id} did not answer within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("asking node {id} for metadata"))
    }

    /// Every responsive node's view; nodes that fail to answer are left out.
    async fn views(&self) -> Vec<MetadataResponse> {
        let asks = self
            .node_ids()
            .into_iter()
            .filter(|&id| self.is_responsive(id))
            .map(|id| self.node_metadata(id));
        futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// The node named by more than half of all the cluster's nodes.
    fn majority(&self, named: impl Iterator<Item = NodeId>) -> Option<NodeId> {
        let mut votes: HashMap<NodeId, usize> = HashMap::new();
        for n in named {
            *votes.entry(n).or_default() += 1;
        }
        let needed = self.specs.len() / 2 + 1;
        votes
            .into_iter()
            .find(|&(_, v)| v >= needed)
            .map(|(n, _)| n)
    }

    /// Nodes that exited without being told to since the last call, with
    /// their exit status. A crash is a finding, never expected.
    pub fn take_crashes(&mut self) -> Vec<(NodeId, String)> {
        for i in 0..self.procs.len() {
            let exited = self.procs[i].as_mut().and_then(Running::exited);
            if let Some(status) = exited {
                self.crashes.push((self.specs[i].id, status.to_string()));
                self.procs[i] = None;
            }
        }
        std::mem::take(&mut self.crashes)
    }

    /// Every `panicked at` line in any node's log (stderr, across all its
    /// restarts), prefixed with the node: a panic is a finding even when
    /// the process survived it (a panicking tokio task does not end the
    /// process).
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        for spec in &self.specs {
            let text = match std::fs::read(spec.stderr_log()) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    out.push(format!("node {}: cannot read its log: {e}", spec.id));
                    continue;
                }
            };
            out.extend(
                text.lines()
                    .filter(|l| l.contains("panicked at"))
                    .map(|l| format!("node {}: {l}", spec.id)),
            );
        }
        out
    }

    /// The last `lines` lines of a node's log (stderr).
    pub fn log_tail(&self, id: NodeId, lines: usize) -> String {
        match self.spec(id) {
            Ok(spec) => log_tail(&spec.stderr_log(), lines),
            Err(e) => e.to_string(),
        }
    }

    /// Prints the last lines of every node's log to stderr.
    pub fn dump_logs(&self, lines: usize) {
        for spec in &self.specs {
            eprintln!(
                "---- node {} ({}), last {lines} lines ----\n{}",
                spec.id,
                spec.stderr_log().display(),
                log_tail(&spec.stderr_log(), lines)
            );
        }
    }

    fn index(&self, id: NodeId) -> anyhow::Result<usize> {
        let i = (id as usize).wrapping_sub(1);
        if i < self.specs.len() {
            Ok(i)
        } else {
            bail!("no node {id} in a cluster of {}", self.specs.len())
        }
    }

    pub(crate) fn spec(&self, id: NodeId) -> anyhow::Result<&NodeSpec> {
        Ok(&self.specs[self.index(id)?])
    }

    fn running_mut(&mut self, id: NodeId) -> anyhow::Result<&mut Running> {
        let i = self.index(id)?;
        self.procs[i]
            .as_mut()
            .ok_or_else(|| anyhow!("node {id} is not running"))
    }

    /// Takes the node's process out of the cluster, failing if it is not
    /// running or has already exited on its own (recorded as a crash).
    fn take_running(&mut self, id: NodeId) -> anyhow::Result<Running> {
        let i = self.index(id)?;
        let mut p = self.procs[i]
            .take()
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        if let Some(status) = p.exited() {
            self.crashes.push((id, status.to_string()));
            bail!("node {id} had already exited: {status}");
        }
        Ok(p)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().flatten() {
            let _ = p.child.start_kill();
        }
        // Before the directory goes: a mount inside it would keep it.
        for (_, disk) in std::mem::take(&mut self.disks) {
            let _ = disk.unmount();
        }
        let keep = std::env::var_os("COVET_KEEP_CLUSTER").is_some();
        if std::thread::panicking() {
            self.dump_logs(40);
        }
        if std::thread::panicking() || keep {
            if let Some(root) = self.root.take() {
                eprintln!("cluster directory kept at {}", root.keep().display());
            }
        }
    }
}

/// The `--peers` value for `id`: its own peer address, and the proxy on
/// the link to every other node.
fn peers_arg(
    id: NodeId,
    ids: &[NodeId],
    peer_addr: &HashMap<NodeId, SocketAddr>,
    links: &BTreeMap<(NodeId, NodeId), Proxy>,
) -> String {
    let entries: Vec<String> = ids
        .iter()
        .map(|&j| match links.get(&(id, j)) {
            Some(proxy) => format!("{j}={}", proxy.local_addr()),
            None => format!("{j}={}", peer_addr[&j]),
        })
        .collect();
    entries.join(",")
}

/// The leader a metadata answer names for a partition, if any.
fn partition_leader(meta: &MetadataResponse, topic: &str, partition: u32) -> Option<NodeId> {
    meta.topics
        .iter()
        .find(|t| t.name == topic)?
        .partitions
        .iter()
        .find(|p| p.partition == partition)
        .map(|p| p.leader)
        .filter(|&l| l != 0)
}
