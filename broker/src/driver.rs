//! The Raft driver: one thread that owns every Raft group of the node.
//!
//! Handlers send [`Request`]s over a bounded channel; the driver proposes
//! them, then runs one *round*: it collects the `Ready` of every group that
//! has one, applies what is committed, appends new entries and hard state to
//! each group's log, syncs all touched logs together (one `fdatasync` per
//! group, issued concurrently), and only then advances the groups, sends
//! persisted messages and applies what became committed. However many
//! proposals arrived since the last round share its syncs: that is the group
//! commit. A proposal is answered only after its entry is committed and
//! applied.
//!
//! The driver runs on its own thread with a current-thread tokio runtime:
//! its `fdatasync` calls block that thread, never a request handler.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use covet_protocol::api::{GroupStatus, TopicConfig};
use covet_protocol::internal::TopicRecord;
use covet_raft_store::{create_dir_durable, sync_dir, GroupStorage, LogOptions};
use tokio::sync::{mpsc, oneshot, watch};

use crate::catalog::Catalog;
use crate::error::{BrokerError, Result};
use crate::faults::{barrier_admits, clamp_heartbeat, guard, implausible, is_rebuild_report};
use crate::group::{Applied, Bootstrap, Group, GroupConfig, Machine, Responder};
use crate::logging::raft_logger;
use crate::state::groups::GroupEntry;
use crate::state::meta::{MetaEffect, MetaState};
use crate::transport::{Inbound, Transport};

/// Raft's logical clock.
const TICK: Duration = Duration::from_millis(100);
/// Requests taken from the channel before running a round, so one round's
/// latency stays bounded under load.
const MAX_REQUESTS_PER_ROUND: usize = 4096;
/// Threads that sync the logs of one round besides the driver's own.
const SYNC_THREADS: usize = 3;
/// How long a request may wait for its entry to be applied.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping node tries to hand its leaderships over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);
/// Group 0 holds the cluster metadata.
pub const META_GROUP: u64 = 0;

/// A request to the driver.
pub enum Request {
    /// A validated record batch for partition group `group`.
    Produce {
        topic: String,
        group: u64,
        batch: Bytes,
        tx: Responder,
    },
    /// Creates a topic; the driver assigns its replicas.
    CreateTopic {
        name: String,
        config: TopicConfig,
        tx: Responder,
    },
    /// A consumer group's commit, reset or deletion on one partition.
    GroupEntry {
        group: u64,
        entry: GroupEntry,
        tx: Responder,
    },
    /// An encoded metadata command for group 0.
    Meta { data: Vec<u8>, tx: Responder },
    /// Adds (`add`) or removes a voter of the metadata group.
    ChangeMembership { add: bool, node: u64, tx: Responder },
    /// This node's view of every group.
    Status {
        tx: oneshot::Sender<Vec<GroupStatus>>,
    },
}

/// Driver settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub log_options: LogOptions,
    pub retention_interval: Duration,
    /// The cluster's nodes at bootstrap, this one included: the first
    /// voters of the metadata group. Just this node when it runs alone.
    pub initial_nodes: Vec<u64>,
}

/// How the rest of the node talks to the driver.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Request>,
    pub catalog: Arc<Catalog>,
    pub node_id: u64,
    /// True once every group has a leader and applied what it found
    /// committed (see `Driver::update_ready`); never false again.
    pub ready: watch::Receiver<bool>,
}

impl NodeHandle {
    async fn call(&self, make: impl FnOnce(Responder) -> Request) -> Result<Applied> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
            Ok(outcome) => outcome.map_err(|_| BrokerError::ShuttingDown)?,
            Err(_) => Err(BrokerError::Timeout(
                "waiting for the command to commit".into(),
            )),
        }
    }

    /// Submits a batch without waiting for it: the returned receiver is
    /// answered once it is applied. Submissions from one caller are
    /// proposed in the order they are made.
    pub async fn submit_batch(
        &self,
        topic: &str,
        group: u64,
        batch: Bytes,
    ) -> Result<oneshot::Receiver<Result<Applied>>> {
        let (tx, rx) = oneshot::channel();
        let topic = topic.to_string();
        self.tx
            .send(Request::Produce {
                topic,
                group,
                batch,
                tx,
            })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        Ok(rx)
    }

    /// Proposes a consumer group's entry to the partition whose Raft group
    /// is `group` (this node must lead it) and waits until it is applied.
    pub async fn group_entry(&self, group: u64, entry: GroupEntry) -> Result<()> {
        match self
            .call(|tx| Request::GroupEntry { group, entry, tx })
            .await?
        {
            Applied::Group => Ok(()),
            _ => Err(BrokerError::Internal(
                "a group entry answered with something else".into(),
            )),
        }
    }

    /// Proposes a metadata command and waits for its outcome.
    pub async fn meta(&self, data: Vec<u8>) -> Result<MetaEffect> {
        Self::effect(self.call(|tx| Request::Meta { data, tx }).await?)
    }

    /// Creates a topic, replicas chosen by the metadata leader.
    pub async fn create_topic(&self, name: String, config: TopicConfig) -> Result<MetaEffect> {
        Self::effect(
            self.call(|tx| Request::CreateTopic { name, config, tx })
                .await?,
        )
    }

    fn effect(applied: Applied) -> Result<MetaEffect> {
        match applied {
            Applied::Meta(effect) => Ok(effect),
            _ => Err(BrokerError::Internal(
                "metadata answered with something else".into(),
            )),
        }
    }

    /// Adds a voter to (or removes one from) the metadata group; returns
    /// its voters once applied.
    pub async fn change_membership(&self, add: bool, node: u64) -> Result<Vec<u64>> {
        match self
            .call(|tx| Request::ChangeMembership { add, node, tx })
            .await?
        {
            Applied::Membership(voters) => Ok(voters),
            _ => Err(BrokerError::Internal(
                "unexpected membership outcome".into(),
            )),
        }
    }

    /// Every group's state as this node sees it.
    pub async fn status(&self) -> Result<Vec<GroupStatus>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Status { tx })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)
    }
}

/// A running driver: its handle, readiness, and the thread's outcome.
pub struct Running {
    pub handle: NodeHandle,
    pub ready: watch::Receiver<bool>,
    pub done: oneshot::Receiver<Result<()>>,
}

/// Opens the node's state and starts the driver thread. Outgoing Raft
/// messages go to `transport`; messages from peers arrive on `inbound`.
pub fn start(
    config: DriverConfig,
    shutdown: watch::Receiver<bool>,
    transport: Transport,
    inbound: mpsc::Receiver<Inbound>,
) -> Result<Running> {
    let (tx, rx) = mpsc::channel(MAX_REQUESTS_PER_ROUND);
    let (ready_tx, ready) = watch::channel(false);
    let catalog = Arc::new(Catalog::default());
    let channels = Channels {
        requests: rx,
        inbound,
        transport,
    };
    let mut driver = Driver::open(config.clone(), catalog.clone(), channels, ready_tx)?;
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("covet-raft".into())
        .spawn(move || {
            let result = driver.run(shutdown);
            let _ = done_tx.send(result);
        })
        .map_err(|e| BrokerError::Internal(format!("spawn raft thread: {e}")))?;
    Ok(Running {
        handle: NodeHandle {
            tx,
            catalog,
            node_id: config.node_id,
            ready: ready.clone(),
        },
        ready,
        done,
    })
}

/// How the driver hears from, and talks to, the rest of the node.
struct Channels {
    requests: mpsc::Receiver<Request>,
    inbound: mpsc::Receiver<Inbound>,
    transport: Transport,
}

pub(crate) struct Driver {
    pub(crate) config: DriverConfig,
    pub(crate) db: sled::Db,
    pub(crate) groups: HashMap<u64, Group>,
    /// Retention settings of each partition group.
    pub(crate) retention: HashMap<u64, (u64, u64)>,
    pub(crate) catalog: Arc<Catalog>,
    /// Groups out of service on this node, and why (see [`crate::faults`]).
    pub(crate) faulted: std::collections::BTreeMap<u64, String>,
    pub(crate) logger: slog::Logger,
    channels: Channels,
    ready: watch::Sender<bool>,
    sync_pool: SyncPool,
}

impl Driver {
    fn open(
        config: DriverConfig,
        catalog: Arc<Catalog>,
        channels: Channels,
        ready: watch::Sender<bool>,
    ) -> Result<Driver> {
        let db = open_sled(&config.data_dir.join("state"))?;
        create_dir_durable(&config.data_dir.join("groups"))?;
        let mut driver = Driver {
            config,
            db,
            groups: HashMap::new(),
            retention: HashMap::new(),
            catalog,
            faulted: Default::default(),
            logger: raft_logger(),
            channels,
            ready,
            sync_pool: SyncPool::start(SYNC_THREADS)?,
        };
        covet_raft_store::remove_leftovers(&driver.config.data_dir.join("groups"))?;
        let mut meta = MetaState::open(driver.db.open_tree("meta")?)?;
        meta.publish_producer_ids(driver.catalog.producer_ids());
        meta.publish_consumer_groups(driver.catalog.consumer_groups_sender());
        let topics: Vec<TopicRecord> = meta.topics().cloned().collect();
        let mut voters = driver.config.initial_nodes.clone();
        voters.sort_unstable();
        let bootstrap = Bootstrap {
            preferred_leader: voters.first().copied().unwrap_or(driver.config.node_id),
            voters,
        };
        let group = driver.open_group(META_GROUP, Machine::Meta(meta), &bootstrap)?;
        driver.catalog.set_meta_leader(group.leader.subscribe());
        driver.groups.insert(META_GROUP, group);
        driver.open_topics(topics)?;
        Ok(driver)
    }

    pub(crate) fn group_dir(&self, id: u64) -> PathBuf {
        self.config.data_dir.join("groups").join(id.to_string())
    }

    pub(crate) fn open_group(
        &self,
        id: u64,
        machine: Machine,
        bootstrap: &Bootstrap,
    ) -> Result<Group> {
        open_group_in(&self.config, &self.logger, id, machine, bootstrap)
    }

    fn run(&mut self, shutdown: watch::Receiver<bool>) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| BrokerError::Internal(format!("raft runtime: {e}")))?;
        let result = rt.block_on(async {
            self.run_loop(shutdown).await?;
            self.hand_over_leadership().await
        });
        for (id, g) in self.groups.iter_mut() {
            g.fail_all(BrokerError::ShuttingDown);
            // A clean stop leaves nothing to replay.
            if let Err(e) = g.checkpoint(true) {
                tracing::warn!(group = id, error = %e, "final checkpoint failed; the log will be replayed");
            }
            // And nothing to scan: the next start loads the active
            // segment's index instead of checksumming up to a segment.
            if let Err(e) = g.storage.seal_for_restart() {
                tracing::warn!(group = id, error = %e, "cannot seal the log for restart; the next start scans it");
            }
        }
        self.db.flush()?;
        result
    }

    async fn run_loop(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retention = tokio::time::interval(self.config.retention_interval);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.round()?;
            if self.groups.values().any(|g| g.node.has_ready()) {
                continue;
            }
            // Timers and peers come before client requests: under sustained
            // load the request channel is never empty, and what is polled
            // after it would starve (no ticks, no heartbeats).
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = tick.tick() => self.tick_all(),
                _ = retention.tick() => self.enforce_retention(),
                Some(m) = self.channels.inbound.recv() => self.step(m),
                req = self.channels.requests.recv() => match req {
                    Some(req) => self.handle(req),
                    None => return Ok(()),
                },
            }
            self.drain();
        }
    }

    /// Takes what else is waiting, bounded so one round stays short.
    fn drain(&mut self) {
        for _ in 0..MAX_REQUESTS_PER_ROUND {
            match self.channels.inbound.try_recv() {
                Ok(m) => self.step(m),
                Err(_) => break,
            }
        }
        for _ in 0..MAX_REQUESTS_PER_ROUND {
            match self.channels.requests.try_recv() {
                Ok(req) => self.handle(req),
                Err(_) => break,
            }
        }
    }

    /// Steps a peer's message into its group. Messages for groups this node
    /// does not have (yet) are dropped; Raft resends.
    fn step(&mut self, mut m: Inbound) {
        if is_rebuild_report(&m.message) {
            self.on_rebuild_report(m.group, &m.message);
            return;
        }
        if m.group != META_GROUP && self.removed_from_cluster(m.message.from) {
            // A node removed from the cluster may never learn it: the
            // metadata leader stops sending to it once the removal applies,
            // possibly before it saw the commit. Leading a partition, it
            // would then never hand over, and the partition would keep it
            // forever. Ignoring it makes it lose its quorum (check-quorum)
            // and lets the replicas that stay elect a leader, which
            // removes it from the group.
            return;
        }
        let Some(g) = self.groups.get_mut(&m.group) else {
            return;
        };
        if g.vote_barrier.is_some() && !barrier_admits(g, &mut m.message) {
            return;
        }
        if let Some(why) = implausible(g, &m.message) {
            tracing::debug!(
                group = m.group,
                from = m.message.from,
                why,
                "peer message dropped"
            );
            return;
        }
        if clamp_heartbeat(g, &mut m.message) {
            tracing::debug!(
                group = m.group,
                from = m.message.from,
                "heartbeat commit index past the log ignored"
            );
        }
        let outcome = guard(|| {
            if let Err(e) = g.node.step(m.message) {
                tracing::debug!(group = m.group, error = %e, "raft step failed");
            }
            Ok(())
        });
        if let Err(reason) = outcome {
            self.quarantine(m.group, reason);
        }
    }

    /// Whether `node` was removed from the metadata group as this node,
    /// itself still a member, sees it.
    fn removed_from_cluster(&self, node: u64) -> bool {
        let Some(meta) = self.groups.get(&META_GROUP) else {
            return false;
        };
        let conf = meta.node.raft.prs().conf();
        let voters = conf.voters();
        voters.contains(self.config.node_id) && !voters.contains(node)
    }

    /// Before stopping, moves the leadership of every group this node leads
    /// to its most caught-up follower, so clients see a short handover
    /// instead of an election timeout. Bounded in time.
    async fn hand_over_leadership(&mut self) -> Result<()> {
        let me = self.config.node_id;
        for g in self.groups.values_mut() {
            if let Some(target) = g.transfer_target() {
                g.node.transfer_leader(target);
            }
        }
        let deadline = tokio::time::Instant::now() + HANDOVER_TIMEOUT;
        let mut tick = tokio::time::interval(TICK);
        while self
            .groups
            .values()
            .any(|g| g.is_leader() && g.transfer_target().is_some())
        {
            self.round()?;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick() => self.tick_all(),
                Some(m) = self.channels.inbound.recv() => self.step(m),
            }
        }
        let still = self
            .groups
            .values()
            .filter(|g| g.node.raft.leader_id == me)
            .count();
        if still > 0 {
            tracing::info!(groups = still, "stopping while still leading");
        }
        Ok(())
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Produce {
                topic,
                group,
                batch,
                tx,
            } => match self.groups.get_mut(&group) {
                Some(g) => {
                    if let Err(reason) = guard(|| {
                        g.propose_batch(batch, tx);
                        Ok(())
                    }) {
                        self.quarantine(group, reason);
                    }
                }
                None => {
                    let err = match self.faulted.get(&group) {
                        Some(reason) => BrokerError::ReplicaFaulted {
                            group,
                            reason: reason.clone(),
                        },
                        // Deleted between validation and proposal.
                        None => BrokerError::UnknownTopic(topic),
                    };
                    let _ = tx.send(Err(err));
                }
            },
            Request::GroupEntry { group, entry, tx } => match self.groups.get_mut(&group) {
                Some(g) if matches!(g.machine, Machine::Partition(_)) => {
                    if let Err(reason) = guard(|| {
                        g.propose_group_entry(&entry, tx);
                        Ok(())
                    }) {
                        self.quarantine(group, reason);
                    }
                }
                _ => {
                    let err = match self.faulted.get(&group) {
                        Some(reason) => BrokerError::ReplicaFaulted {
                            group,
                            reason: reason.clone(),
                        },
                        None => BrokerError::UnknownPartition {
                            topic: String::new(),
                            partition: 0,
                        },
                    };
                    let _ = tx.send(Err(err));
                }
            },
            Request::CreateTopic { name, config, tx } => {
                self.propose_create_topic(name, config, tx)
            }
            Request::Meta { data, tx } => self.propose_meta(data, tx),
            Request::ChangeMembership { add, node, tx } => {
                let change = membership_change(add, node);
                match self.groups.get_mut(&META_GROUP) {
                    // Checked before anything else (a lone leader removing
                    // itself would otherwise be told to retry elsewhere):
                    // raft-rs refuses to apply such a change, so proposing
                    // it could only fail.
                    Some(g) if !add && removes_last_voter(&g.voters(), node) => {
                        let _ = tx.send(Err(BrokerError::MembershipConflict(format!(
                            "node {node} is the metadata group's last voter; a cluster cannot \
                             remove its last node"
                        ))));
                    }
                    Some(g) if !add && g.is_leader() && !leaves_live_quorum(g, node) => {
                        let _ = tx.send(Err(BrokerError::MembershipConflict(format!(
                            "removing node {node} would leave a metadata group whose reachable \
                             voters are not a majority; remove an unreachable node first, or \
                             retry once the others are back"
                        ))));
                    }
                    // A leader that removed itself would go on leading a
                    // group it is not a voter of (raft-rs does not step it
                    // down), and nothing would commit: it hands over first
                    // and the new leader, where the client retries, removes
                    // it.
                    Some(g) if !add && node == g.node.raft.id && g.is_leader() => {
                        let target = g.transfer_target();
                        if let Some(t) = target {
                            g.node.transfer_leader(t);
                        }
                        let _ = tx.send(Err(BrokerError::NotLeader {
                            leader_hint: target.unwrap_or(0),
                        }));
                    }
                    Some(g) => {
                        g.propose_membership(change, tx);
                    }
                    None => {
                        let _ =
                            tx.send(Err(BrokerError::Internal("metadata group missing".into())));
                    }
                }
            }
            Request::Status { tx } => {
                let _ = tx.send(self.status());
            }
        }
    }

    pub(crate) fn propose_meta(&mut self, data: Vec<u8>, tx: Responder) {
        match self.groups.get_mut(&META_GROUP) {
            Some(g) => {
                g.propose(Bytes::from(data), tx);
            }
            None => {
                let _ = tx.send(Err(BrokerError::Internal("metadata group missing".into())));
            }
        }
    }

    fn tick_all(&mut self) {
        let mut failed = Vec::new();
        for (&id, g) in self.groups.iter_mut() {
            let outcome = guard(|| {
                g.node.tick();
                g.checkpoint(false)?;
                g.check_snapshots();
                crate::faults::report_rebuild(g, &self.channels.transport);
                // A leader that is no longer a voter (removed by a change it
                // proposed itself, e.g. by an older version) would stall its
                // group for good: hand over.
                if g.is_leader() && !g.voters().contains(&g.node.raft.id) {
                    if let Some(t) = g.transfer_target() {
                        g.node.transfer_leader(t);
                    }
                }
                Ok(())
            });
            if let Err(reason) = outcome {
                failed.push((id, reason));
            }
        }
        for (id, reason) in failed {
            self.quarantine(id, reason);
        }
        self.reconcile_replicas();
    }

    /// Moves each partition this node leads towards its assigned replicas
    /// among the metadata group's voters: a node removed from the cluster
    /// leaves every partition, a node (re-)added joins the partitions
    /// assigned to it. One change per group at a time.
    fn reconcile_replicas(&mut self) {
        let Some(meta) = self.groups.get(&META_GROUP) else {
            return;
        };
        let members = meta.voters();
        for topic in self.catalog.topics() {
            for p in &topic.partitions {
                let Some(g) = self.groups.get_mut(&p.group) else {
                    continue;
                };
                if !g.is_leader() || g.membership_pending() {
                    continue;
                }
                let desired: Vec<u64> = p
                    .replicas
                    .iter()
                    .copied()
                    .filter(|n| members.contains(n))
                    .collect();
                let voters = g.voters();
                let me = g.node.raft.id;
                let change = match desired.iter().find(|n| !voters.contains(n)) {
                    Some(&add) => membership_change(true, add),
                    None => match voters.iter().find(|n| !desired.contains(n)) {
                        // Never remove itself while leading (see
                        // `handle`): hand over to a replica that stays,
                        // which then removes this node.
                        Some(&remove) if remove == me && !desired.is_empty() => {
                            if let Some(t) = g.transfer_target_among(Some(&desired)) {
                                g.node.transfer_leader(t);
                            }
                            continue;
                        }
                        Some(&remove) if !desired.is_empty() => membership_change(false, remove),
                        _ => continue,
                    },
                };
                let (tx, _) = oneshot::channel();
                g.propose_membership(change, tx);
            }
        }
    }

    fn enforce_retention(&mut self) {
        let now = crate::now_ms();
        for (gid, &(ms, bytes)) in &self.retention {
            if let Some(g) = self.groups.get_mut(gid) {
                if let Err(e) = g.enforce_retention(now, ms, bytes) {
                    tracing::warn!(group = gid, error = %e, "retention failed; will retry");
                }
            }
        }
    }

    /// One round over every group with a `Ready`; see the module docs.
    fn round(&mut self) -> Result<()> {
        let _span = tracing::debug_span!("raft_round").entered();
        let mut effects = Vec::new();
        let mut pending = Vec::new();
        let mut failed = Vec::new();
        for (&id, g) in self.groups.iter_mut() {
            let transport = &self.channels.transport;
            match guard(|| g.write_ready(transport, &mut effects)) {
                Ok(Some(rd)) => pending.push((id, rd)),
                Ok(None) => {}
                Err(reason) => failed.push((id, reason)),
            }
        }
        for (id, reason) in failed.drain(..) {
            self.quarantine(id, reason);
        }
        pending.retain(|(id, _)| self.groups.contains_key(id));
        if pending.is_empty() {
            return Ok(());
        }
        let storages: Vec<&GroupStorage> = pending
            .iter()
            .filter_map(|(id, _)| self.groups.get(id).map(|g| &g.storage))
            .collect();
        self.sync_pool.sync_all(&storages)?;
        for (id, rd) in pending {
            if let Some(g) = self.groups.get_mut(&id) {
                let transport = &self.channels.transport;
                if let Err(reason) = guard(|| g.finish_ready(rd, transport, &mut effects)) {
                    failed.push((id, reason));
                }
            }
        }
        for (id, reason) in failed {
            self.quarantine(id, reason);
        }
        for (_, effect) in effects {
            match effect {
                MetaEffect::TopicCreated(t) => self.open_topics(vec![t])?,
                MetaEffect::TopicDeleted(t) => self.drop_topic(&t)?,
                MetaEffect::ProducerId(_) | MetaEffect::ConsumerGroup => {}
            }
        }
        self.update_ready();
        Ok(())
    }

    /// The node is ready once every group has a leader and has applied all
    /// it found committed.
    fn update_ready(&self) {
        if *self.ready.borrow() {
            return;
        }
        let all = self.groups.values().all(|g| {
            let r = &g.node.raft;
            r.leader_id != 0 && r.raft_log.applied >= r.raft_log.committed
        });
        if all {
            let _ = self.ready.send(true);
        }
    }
}

/// Opens the applied state. sled is never the only copy of a fact (the
/// Raft logs are), so a sled that cannot be opened — after a power cut it
/// may hold any mix of its unsynced writes — is moved aside and rebuilt by
/// replaying the logs.
fn open_sled(dir: &std::path::Path) -> Result<sled::Db> {
    let open = || {
        sled::Config::new()
            .path(dir)
            .cache_capacity(8 << 20)
            .flush_every_ms(Some(200))
            .open()
    };
    create_dir_durable(dir)?;
    let db = match open() {
        Ok(db) => db,
        Err(e) => {
            let aside = dir.with_extension(format!("broken-{}", crate::now_ms()));
            tracing::warn!(error = %e, moved_to = %aside.display(),
                "applied state unreadable; moving it aside and replaying the logs");
            std::fs::rename(dir, &aside)?;
            create_dir_durable(dir)?;
            open()?
        }
    };
    // sled creates its files without syncing their directory entries.
    sync_dir(dir)?;
    Ok(db)
}

/// Opens group `id` of the node configured by `config` (see
/// [`Group::open`]); a free function so that startup can open many groups
/// on several threads.
pub(crate) fn open_group_in(
    config: &DriverConfig,
    logger: &slog::Logger,
    id: u64,
    machine: Machine,
    bootstrap: &Bootstrap,
) -> Result<Group> {
    let cfg = GroupConfig {
        node_id: config.node_id,
        log_options: config.log_options,
        logger,
        election_tick: 10,
        heartbeat_tick: 2,
        fixed_election_timeout: None,
    };
    let dir = config.data_dir.join("groups").join(id.to_string());
    Group::open(id, &dir, machine, &cfg, bootstrap)
}

/// Threads that sync the logs of a round in parallel, started once with
/// the driver: spawning them per round (as a scoped pool did) cost tens of
/// microseconds per thread on every round that touched several
/// partitions.
pub(crate) struct SyncPool {
    jobs: std::sync::mpsc::Sender<SyncJob>,
}

/// One log to sync, and where to say how it went.
type SyncJob = (GroupStorage, std::sync::mpsc::Sender<Result<()>>);

impl SyncPool {
    fn start(threads: usize) -> Result<SyncPool> {
        let (jobs, rx) = std::sync::mpsc::channel::<SyncJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("covet-sync-{i}"))
                .spawn(move || loop {
                    // Ends when the driver (the only sender) is gone.
                    let job = rx.lock().map(|r| r.recv());
                    let Ok(Ok((storage, done))) = job else {
                        return;
                    };
                    let _ = done.send(storage.sync().map_err(Into::into));
                })
                .map_err(|e| BrokerError::Internal(format!("spawn sync thread: {e}")))?;
        }
        Ok(SyncPool { jobs })
    }

    /// Syncs every log touched in a round, concurrently: the round's
    /// latency is that of the slowest sync, not their sum. The driver's
    /// thread syncs the first log itself.
    #[tracing::instrument(level = "debug", skip_all, fields(groups = storages.len()))]
    fn sync_all(&self, storages: &[&GroupStorage]) -> Result<()> {
        let Some((first, rest)) = storages.split_first() else {
            return Ok(());
        };
        let (done, results) = std::sync::mpsc::channel();
        for s in rest {
            self.jobs
                .send(((*s).clone(), done.clone()))
                .map_err(|_| BrokerError::Internal("sync threads are gone".into()))?;
        }
        drop(done);
        let mine = first.sync().map_err(Into::into);
        let mut outcome = mine;
        for _ in rest {
            let r = results
                .recv()
                .unwrap_or_else(|_| Err(BrokerError::Internal("a sync thread died".into())));
            if outcome.is_ok() {
                outcome = r;
            }
        }
        outcome
    }
}

/// Whether removing `node` would leave `voters` empty.
fn removes_last_voter(voters: &[u64], node: u64) -> bool {
    voters.contains(&node) && voters.iter().all(|&v| v == node)
}

/// Whether the voters left after removing `node` include a majority that
/// this leader currently replicates to (itself included). A removal that
/// left a majority of unreachable voters would stop the metadata group
/// until they came back. A follower counts as reachable while raft-rs saw
/// it recently (`recent_active`, kept by check-quorum: any message from it
/// within the last election timeout) or replicates to it. Not by the
/// replicate state alone: in an idle group a follower that was briefly cut
/// off stays in probe, answering heartbeats, until the next entry.
fn leaves_live_quorum(g: &Group, node: u64) -> bool {
    let me = g.node.raft.id;
    let prs = g.node.raft.prs();
    let remaining: Vec<u64> = g.voters().into_iter().filter(|&v| v != node).collect();
    let live = remaining
        .iter()
        .filter(|&&v| {
            v == me
                || prs.get(v).is_some_and(|pr| {
                    pr.recent_active || pr.state == raft::ProgressState::Replicate
                })
        })
        .count();
    live > remaining.len() / 2
}

/// A single-node membership change.
fn membership_change(add: bool, node: u64) -> raft::prelude::ConfChangeV2 {
    use raft::prelude::ConfChangeType;
    let ty = if add {
        ConfChangeType::AddNode
    } else {
        ConfChangeType::RemoveNode
    };
    let mut cc = raft::prelude::ConfChangeV2::default();
    cc.set_changes(vec![raft_proto::new_conf_change_single(node, ty)].into());
    cc
}
