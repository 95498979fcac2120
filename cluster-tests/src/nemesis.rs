//! The nemesis: a seeded random schedule of faults run against a cluster
//! under steady load, with the checker at the end.
//!
//! [`Schedule::generate`] turns a seed into a list of [`Step`]s, each a
//! [`Fault`] held for a while and then healed, followed by a gap: kill -9
//! and restart, power cut and restart, SIGSTOP and SIGCONT, a full
//! partition of one node, one directed link dropped, every link out of one
//! node dropped, delayed links, `remove-node` then `add-node`, and quiet
//! stretches with no fault. The schedule is a pure function of the seed and
//! the cluster's shape, so a failing run is reproduced by its seed (the
//! processes' timing is not reproducible, the schedule is). A fault aimed at
//! "the leader of" a group names a fallback node, used when no leader is
//! known at that moment, so resolving a target needs no randomness either.
//!
//! [`run`] executes a schedule: one fault at a time, so a majority always
//! exists and the load can progress; after each heal it requires every
//! partition to acknowledge a record sent after the heal. It stops starting
//! steps once its time budget is spent, heals everything, waits until every
//! group has a leader, lists every node and has every replica caught up,
//! then stops the load and requires from the checker lost = 0, duplicated =
//! 0, out of order = 0, no unresolved send, identical replicas, no crash and
//! no `panicked at` in any node's log. Each step is printed as it runs (and
//! written into every node's log), with the time since the start and the
//! wall-clock time the node logs use; every failure message names the seed.
//!
//! Environment:
//! - `COVET_NEMESIS_SEED`: the seed (default: taken from the clock); always
//!   printed first as `nemesis seed = N`;
//! - `COVET_NEMESIS_SECS`: how long faults are injected, in seconds
//!   (default [`DEFAULT_SECS`]; e.g. 600 for a soak run). Setup, the final
//!   convergence and the checker come on top.
//!
//! Power cuts go through a [`PowerSupply`]. Until the power-loss filesystem
//! is wired into the cluster, [`KillPower`] stands in for it: it kills the
//! node with SIGKILL, so a `PowerCut` step currently loses only what
//! `kill -9` loses (nothing the page cache holds). The step keeps its own
//! name in the schedule so that the seeds, and the schedules they print,
//! stay the same once a real power cut is plugged in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use covet_client::{Client, GroupStatus};
use futures::future::BoxFuture;

use crate::checker::Report;
use crate::cluster::{Cluster, NodeId, CALL_TIMEOUT};
use crate::proxy::Mode;
use crate::workload::{Load, LoadConfig};
use crate::CLIENT_CALL_TIMEOUT;

/// Default fault-injection time in seconds; with setup and the final check
/// a run takes about two minutes.
pub const DEFAULT_SECS: u64 = 90;
/// Bound on every recovery: progress after a heal, a membership change
/// taking effect, a node catching up.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(45);
/// Records acknowledged before the first fault.
const WARMUP_ACKS: u64 = 300;
/// Records acknowledged after everything healed, before the load stops.
const TAIL_ACKS: u64 = 600;
/// Pause between two membership or status probes.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A tiny, stable PRNG (SplitMix64): the schedule for a seed must never
/// change with a dependency's version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration in `[lo_ms, hi_ms]` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.below(hi_ms.saturating_sub(lo_ms) + 1))
    }
}

/// A Raft group a fault can aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Group 0, the metadata group.
    Metadata,
    /// A partition of the load's topic.
    Partition(u32),
}

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Node(NodeId),
    /// The group's leader when the step starts, or `fallback` if the
    /// cluster names none then.
    LeaderOf {
        group: Group,
        fallback: NodeId,
    },
}

/// One fault; each is healed by its step (see [`Step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then a restart on the same data dir.
    Kill9(Target),
    /// A power cut (the process dies and what it had not synced is lost),
    /// then a restart; see [`PowerSupply`].
    PowerCut(Target),
    /// SIGSTOP, then SIGCONT.
    Pause(Target),
    /// Every link to and from the node dropped, then passed again.
    Isolate(Target),
    /// The one directed link from `from` to the node `skip` places after it
    /// (counting round the ids) dropped: `from`'s messages to it are lost,
    /// its messages to `from` still arrive.
    OneWay { from: Target, skip: u64 },
    /// Every link out of the node dropped: it hears the others, they do not
    /// hear it.
    Mute(Target),
    /// Every link to and from the node delayed.
    Delay { node: Target, delay: Duration },
    /// `remove-node`, wait until it left every group, then `add-node` and
    /// wait until it is back and caught up in every group.
    Membership(Target),
    /// Nothing: all healed, the load runs undisturbed.
    Quiet,
}

/// A fault, how long it is held before it is healed, and the quiet gap
/// after the heal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub fault: Fault,
    pub hold: Duration,
    pub gap: Duration,
}

/// The faults of one run, derived from a seed; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub steps: Vec<Step>,
}

impl Schedule {
    /// Steps whose holds and gaps add up to at least `budget`, for a
    /// cluster of nodes `1..=nodes` loading `partitions` partitions. A run
    /// usually stops before the last ones (recoveries take time too).
    pub fn generate(seed: u64, budget: Duration, nodes: u64, partitions: u32) -> Schedule {
        let mut rng = Rng::new(seed);
        let mut steps = Vec::new();
        let mut planned = Duration::ZERO;
        while planned < budget {
            let step = random_step(&mut rng, nodes.max(1), partitions.max(1));
            planned += step.hold + step.gap;
            steps.push(step);
        }
        Schedule { seed, steps }
    }
}

fn random_target(rng: &mut Rng, nodes: u64, partitions: u32) -> Target {
    let fallback = 1 + rng.below(nodes);
    if rng.below(2) == 0 {
        return Target::Node(fallback);
    }
    // The metadata group as often as any one partition.
    let g = rng.below(u64::from(partitions) + 1);
    let group = if g == 0 {
        Group::Metadata
    } else {
        Group::Partition(g as u32 - 1)
    };
    Target::LeaderOf { group, fallback }
}

/// One step, its fault drawn by weight (kills and pauses most often).
fn random_step(rng: &mut Rng, nodes: u64, partitions: u32) -> Step {
    let target = random_target(rng, nodes, partitions);
    // Weights of the faults below, in order.
    const WEIGHTS: [u64; 9] = [14, 10, 14, 12, 12, 6, 12, 10, 10];
    let mut pick = rng.below(WEIGHTS.iter().sum());
    let kind = WEIGHTS
        .iter()
        .position(|&w| {
            let hit = pick < w;
            pick = pick.saturating_sub(w);
            hit
        })
        .unwrap_or(0);
    // Holds are fault windows: some shorter than the 1 s election timeout
    // (a blip the leader should ride out), most well past it.
    let (fault, hold) = match kind {
        0 => (Fault::Kill9(target), rng.millis(500, 6_000)),
        1 => (Fault::PowerCut(target), rng.millis(500, 6_000)),
        2 => (Fault::Pause(target), rng.millis(300, 5_000)),
        3 => (Fault::Isolate(target), rng.millis(500, 6_000)),
        4 => {
            let skip = 1 + rng.below(nodes.saturating_sub(1).max(1));
            let from = target;
            (Fault::OneWay { from, skip }, rng.millis(1_000, 8_000))
        }
        5 => (Fault::Mute(target), rng.millis(1_000, 6_000)),
        6 => {
            let delay = rng.millis(10, 400);
            (
                Fault::Delay {
                    node: target,
                    delay,
                },
                rng.millis(2_000, 8_000),
            )
        }
        7 => (Fault::Membership(target), rng.millis(500, 5_000)),
        _ => (Fault::Quiet, rng.millis(3_000, 8_000)),
    };
    Step {
        fault,
        hold,
        gap: rng.millis(500, 3_000),
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Metadata => write!(f, "the metadata group"),
            Group::Partition(p) => write!(f, "partition {p}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(n) => write!(f, "node {n}"),
            Target::LeaderOf { group, fallback } => {
                write!(f, "the leader of {group} (else node {fallback})")
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill9(t) => write!(f, "Kill9 {t}"),
            Fault::PowerCut(t) => write!(f, "PowerCut {t}"),
            Fault::Pause(t) => write!(f, "Pause (SIGSTOP) {t}"),
            Fault::Isolate(t) => write!(f, "Isolate {t}"),
            Fault::OneWay { from, skip } => {
                write!(
                    f,
                    "OneWay: drop the link from {from} to the node {skip} after it"
                )
            }
            Fault::Mute(t) => write!(f, "Mute: drop every link out of {t}"),
            Fault::Delay { node, delay } => {
                write!(f, "Delay every link of {node} by {} ms", delay.as_millis())
            }
            Fault::Membership(t) => write!(f, "Membership: remove-node {t}, then add-node"),
            Fault::Quiet => write!(f, "Quiet"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} for {:.1}s, then {:.1}s gap",
            self.fault,
            self.hold.as_secs_f64(),
            self.gap.as_secs_f64()
        )
    }
}

/// How a `PowerCut` step cuts a node's power and brings it back. On the
/// power-loss filesystem, with each node's data dir a mount of its own,
/// `cut` drops the mount's unsynced writes (after which every file
/// operation of the node fails) and then SIGKILLs the node; `restore`
/// mounts the backing directory again on the data dir. The runner calls
/// `restore` before restarting a node it cut, in the step or in the final
/// heal.
pub trait PowerSupply: Send + Sync {
    /// Stops the node as a power cut would: the process dies at once and
    /// every write it had not synced is lost.
    fn cut<'a>(
        &'a self,
        cluster: &'a mut Cluster,
        node: NodeId,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Makes the node's data dir usable again; the runner restarts the node
    /// right after.
    fn restore<'a>(
        &'a self,
        cluster: &'a mut Cluster,
        node: NodeId,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// The stand-in power supply: a power cut is a SIGKILL, which loses no
/// write the kernel accepted. The power-loss filesystem (`covet-powerfs`)
/// replaces it with a supply that also drops the unsynced writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct KillPower;

impl PowerSupply for KillPower {
    fn cut<'a>(
        &'a self,
        cluster: &'a mut Cluster,
        node: NodeId,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(cluster.kill9(node))
    }

    fn restore<'a>(&'a self, _: &'a mut Cluster, _: NodeId) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// What a run is given.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    pub seed: u64,
    /// How long faults are injected.
    pub budget: Duration,
    pub load: LoadConfig,
}

impl NemesisConfig {
    /// The seed and budget from the environment (see the module docs), and
    /// the default load, sending for as long as the run lasts.
    pub fn from_env() -> anyhow::Result<NemesisConfig> {
        let seed = match std::env::var("COVET_NEMESIS_SEED") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("COVET_NEMESIS_SEED={s} is not a u64"))?,
            Err(_) => clock_seed(),
        };
        let secs = match std::env::var("COVET_NEMESIS_SECS") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("COVET_NEMESIS_SECS={s} is not a number of seconds"))?,
            Err(_) => DEFAULT_SECS,
        };
        Ok(NemesisConfig {
            seed,
            budget: Duration::from_secs(secs),
            load: LoadConfig {
                max_per_producer: u64::MAX,
                ..LoadConfig::default()
            },
        })
    }
}

fn clock_seed() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Mixed once so that seeds taken a second apart do not look alike.
    Rng::new(now.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
}

/// Runs a nemesis against `cluster` (already started): load, warm-up, the
/// schedule for `config.seed`, final heal and convergence, checker. Returns
/// the report of a clean run; panics, naming the seed, on any failure
/// (while the cluster is alive, so its drop prints every node's log tail
/// and keeps its directory).
pub async fn run(cluster: Cluster, config: NemesisConfig, power: &dyn PowerSupply) -> Report {
    println!("nemesis seed = {}", config.seed);
    let nodes = cluster.node_ids().len() as u64;
    let schedule = Schedule::generate(config.seed, config.budget, nodes, config.load.partitions);
    let mut run = Runner {
        cluster,
        load: None,
        client: None,
        config,
        power,
        started: Instant::now(),
        unpowered: BTreeSet::new(),
        lines: Mutex::default(),
    };
    run.say(format!(
        "{} steps planned for {}s of faults",
        schedule.steps.len(),
        run.config.budget.as_secs()
    ));
    if let Err(e) = run.setup().await {
        run.fail(e.context("setting up"));
    }
    for (i, step) in schedule.steps.iter().enumerate() {
        if run.started.elapsed() >= run.config.budget {
            run.say(format!("budget spent after {i} steps"));
            break;
        }
        if let Err(e) = run.step(i, step).await {
            run.fail(e.context(format!("step {i} ({step})")));
        }
    }
    if let Err(e) = run.converge().await {
        run.fail(e.context("final heal"));
    }
    run.check().await
}

/// A run in progress.
struct Runner<'a> {
    cluster: Cluster,
    load: Option<Load>,
    client: Option<Client>,
    config: NemesisConfig,
    power: &'a dyn PowerSupply,
    started: Instant,
    /// Nodes whose power is cut and not restored yet.
    unpowered: BTreeSet<NodeId>,
    /// Every line printed so far, repeated in the failure message (behind
    /// a lock so that printing needs only `&self`).
    lines: Mutex<Vec<String>>,
}

impl Runner<'_> {
    async fn setup(&mut self) -> anyhow::Result<()> {
        let load = Load::start(&self.cluster, self.config.load.clone()).await?;
        load.wait_acked(WARMUP_ACKS, RECOVERY_TIMEOUT)
            .await
            .context("warm-up")?;
        self.load = Some(load);
        let seeds = self.cluster.client_addrs();
        let client = tokio::time::timeout(CLIENT_CALL_TIMEOUT, Client::connect(&seeds))
            .await
            .map_err(|_| anyhow!("connecting timed out"))??;
        self.client = Some(client);
        self.started = Instant::now();
        self.say("warmed up; faults start".into());
        Ok(())
    }

    fn load(&self) -> anyhow::Result<&Load> {
        self.load.as_ref().context("no load running")
    }

    fn client(&self) -> anyhow::Result<&Client> {
        self.client.as_ref().context("no client")
    }

    /// Injects one fault, holds it, heals it, and requires progress after
    /// the heal.
    async fn step(&mut self, i: usize, step: &Step) -> anyhow::Result<()> {
        let hold = step.hold;
        self.say(format!("step {i}: {step}"));
        self.load()?.mark_fault();
        match &step.fault {
            Fault::Kill9(t) | Fault::PowerCut(t) => {
                let node = self.resolve(t).await;
                let power = matches!(step.fault, Fault::PowerCut(_));
                self.say(format!(
                    "  {} node {node}",
                    if power { "power cut" } else { "kill -9" }
                ));
                if power {
                    self.unpowered.insert(node);
                    self.power.cut(&mut self.cluster, node).await?;
                } else {
                    self.cluster.kill9(node).await?;
                }
                tokio::time::sleep(hold).await;
                if power {
                    self.power.restore(&mut self.cluster, node).await?;
                    self.unpowered.remove(&node);
                }
                self.cluster.restart(node).await?;
                self.say(format!("  node {node} restarted and ready"));
            }
            Fault::Pause(t) => {
                let node = self.resolve(t).await;
                self.say(format!("  SIGSTOP node {node}"));
                self.cluster.stop_signal(node).await?;
                tokio::time::sleep(hold).await;
                self.cluster.cont(node).await?;
                self.say(format!("  SIGCONT node {node}"));
            }
            Fault::Isolate(t) => {
                let node = self.resolve(t).await;
                self.say(format!("  isolate node {node}"));
                self.cluster.partition(node);
                self.heal_after(hold).await;
            }
            Fault::OneWay { from, skip } => {
                let from = self.resolve(from).await;
                let n = self.cluster.node_ids().len() as u64;
                let to = (from - 1 + skip) % n + 1;
                self.say(format!("  drop link {from} → {to}"));
                self.cluster.link(from, to)?.set_mode(Mode::Drop);
                self.heal_after(hold).await;
            }
            Fault::Mute(t) => {
                let node = self.resolve(t).await;
                self.say(format!("  drop every link out of node {node}"));
                self.set_links(|from, _| from == node, Mode::Drop)?;
                self.heal_after(hold).await;
            }
            Fault::Delay { node, delay } => {
                let node = self.resolve(node).await;
                self.say(format!("  delay node {node}'s links"));
                self.set_links(|a, b| a == node || b == node, Mode::Delay(*delay))?;
                self.heal_after(hold).await;
            }
            Fault::Membership(t) => {
                let node = self.resolve(t).await;
                self.membership(node, hold).await?;
            }
            Fault::Quiet => tokio::time::sleep(hold).await,
        }
        self.check_crashes()?;
        let load = self.load()?;
        load.mark_fault();
        let took = load
            .wait_recovered(RECOVERY_TIMEOUT)
            .await
            .context("no progress after the heal")?;
        self.say(format!(
            "  healed; every partition acknowledged a new record {:.1}s later",
            took.as_secs_f64()
        ));
        tokio::time::sleep(step.gap).await;
        Ok(())
    }

    /// Keeps the network fault for `hold`, then passes every link again.
    async fn heal_after(&self, hold: Duration) {
        tokio::time::sleep(hold).await;
        self.cluster.heal();
    }

    fn set_links(&self, pick: impl Fn(NodeId, NodeId) -> bool, mode: Mode) -> anyhow::Result<()> {
        let ids = self.cluster.node_ids();
        for &from in &ids {
            for &to in ids.iter().filter(|&&to| to != from && pick(from, to)) {
                self.cluster.link(from, to)?.set_mode(mode);
            }
        }
        Ok(())
    }

    /// The node a target names now.
    async fn resolve(&self, target: &Target) -> NodeId {
        let (group, fallback) = match *target {
            Target::Node(n) => return n,
            Target::LeaderOf { group, fallback } => (group, fallback),
        };
        let leader = match group {
            Group::Metadata => self.cluster.metadata_leader().await,
            Group::Partition(p) => self.cluster.leader_of(&self.config.load.topic, p).await,
        };
        match leader {
            Ok(Some(n)) => n,
            _ => {
                self.say(format!("  no leader of {group} known; node {fallback}"));
                fallback
            }
        }
    }

    /// Removes `node`, waits until it left every group, holds, adds it
    /// back (retrying while the broker refuses), and waits until it is a
    /// caught-up replica of every group again.
    async fn membership(&mut self, node: NodeId, hold: Duration) -> anyhow::Result<()> {
        let others: Vec<NodeId> = self
            .cluster
            .node_ids()
            .into_iter()
            .filter(|&n| n != node)
            .collect();
        self.say(format!("  remove-node {node}"));
        let client = self.client()?.clone();
        let client = &client;
        let voters = bounded(client.change_membership(false, node)).await?;
        self.say(format!("  removed; metadata voters {voters:?}"));
        self.wait_groups(&others, false)
            .await
            .with_context(|| format!("waiting for node {node} to leave every group"))?;
        self.say(format!("  node {node} left every group"));
        tokio::time::sleep(hold).await;
        self.say(format!("  add-node {node}"));
        // The broker refuses to add a node that some group still lists (a
        // removal not yet applied everywhere): retried until the deadline,
        // printing each new reason once.
        let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
        let mut refused = String::new();
        loop {
            match bounded(client.change_membership(true, node)).await {
                Ok(voters) => {
                    self.say(format!("  added; metadata voters {voters:?}"));
                    break;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let why = format!("{e:#}");
                    if why != refused {
                        self.say(format!("  add-node {node} refused, retrying: {why}"));
                        refused = why;
                    }
                    tokio::time::sleep(PROBE_EVERY).await;
                }
                Err(e) => return Err(e.context(format!("add-node {node}"))),
            }
        }
        let all = self.cluster.node_ids();
        self.wait_groups(&all, true)
            .await
            .with_context(|| format!("waiting for node {node} to rejoin every group"))?;
        self.say(format!(
            "  node {node} is back in every group and caught up"
        ));
        Ok(())
    }

    /// Heals everything and waits until every node serves and every group
    /// has a leader and every node as a caught-up replica.
    async fn converge(&mut self) -> anyhow::Result<()> {
        self.say("final heal: pass every link, resume and restart every node".into());
        self.cluster.heal();
        let ids = self.cluster.node_ids();
        let stopped: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|&n| !self.cluster.is_running(n))
            .collect();
        for &n in &ids {
            if self.cluster.is_running(n) && !self.cluster.is_responsive(n) {
                self.cluster.cont(n).await?;
            }
        }
        for n in std::mem::take(&mut self.unpowered) {
            self.power.restore(&mut self.cluster, n).await?;
        }
        self.cluster.restart_many(&stopped).await?;
        self.wait_groups(&ids, true).await?;
        let load = self.load()?;
        load.mark_fault();
        load.wait_recovered(RECOVERY_TIMEOUT)
            .await
            .context("no progress after the final heal")?;
        load.wait_acked(TAIL_ACKS, RECOVERY_TIMEOUT).await?;
        self.check_crashes()?;
        self.say("converged: every group led, every replica caught up".into());
        Ok(())
    }

    /// Stops the load, runs the checker and asserts on its report.
    async fn check(mut self) -> Report {
        let Some(load) = self.load.take() else {
            self.fail(anyhow!("no load to check"));
        };
        let scenario = format!("nemesis seed {}", self.config.seed);
        let report = match load.finish(&mut self.cluster, &scenario).await {
            Ok(r) => r,
            Err(e) => self.fail(e.context("checking")),
        };
        println!("{}", report.to_json());
        let mut problems = report.problems();
        if report.unresolved > 0 {
            problems.push(format!("unresolved sends = {}", report.unresolved));
        }
        problems.extend(self.panics_in_logs());
        if !problems.is_empty() {
            self.fail(anyhow!(
                "the checker found: {}\n{}",
                problems.join("; "),
                report.to_json()
            ));
        }
        self.say(format!(
            "passed: {} acknowledged, {} records, {:?}",
            report.acked, report.records, report.elapsed
        ));
        report
    }

    /// Waits until every group has a leader whose replicas are exactly
    /// `members` and, if `caught_up`, each of them has matched at least the
    /// commit index its group had when this wait first saw it (caught up
    /// with the moment of asking, which a steady load cannot spoil). Fails
    /// at once if a node crashes meanwhile.
    async fn wait_groups(&mut self, members: &[NodeId], caught_up: bool) -> anyhow::Result<()> {
        let client = self.client()?.clone();
        let groups = self.config.load.partitions as usize + 1;
        let want: BTreeSet<NodeId> = members.iter().copied().collect();
        let mut targets: BTreeMap<u64, u64> = BTreeMap::new();
        let mut last = String::from("no status answered");
        let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
        loop {
            self.check_crashes()?;
            if let Some((leaders, held)) = group_leaders(&client).await {
                let mut wrong = Vec::new();
                for g in leaders.values() {
                    let target = *targets.entry(g.group).or_insert(g.commit);
                    let have: BTreeSet<NodeId> = g.replicas.iter().map(|r| r.node).collect();
                    if have != want {
                        let (group, leader) = (g.group, g.leader);
                        wrong.push(format!("group {group} (leader {leader}) has {have:?}"));
                    }
                    let behind = g.replicas.iter().filter(|r| r.matched < target);
                    for r in behind.filter(|_| caught_up) {
                        let (group, node, matched) = (g.group, r.node, r.matched);
                        wrong.push(format!(
                            "group {group}: node {node} at {matched} < {target}"
                        ));
                    }
                }
                if wrong.is_empty() && leaders.len() == groups.max(held) {
                    return Ok(());
                }
                let led = leaders.len();
                last = format!("{led} of {groups} groups led; {}", wrong.join("; "));
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("not within {RECOVERY_TIMEOUT:?}: {last}");
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    }

    /// The first panic in each node's log, with its message line.
    fn panics_in_logs(&self) -> Vec<String> {
        self.cluster
            .node_ids()
            .into_iter()
            .filter_map(|id| {
                let log = std::fs::read_to_string(node_log(&self.cluster, id)?).ok()?;
                let mut lines = log.lines().skip_while(|l| !l.contains("panicked at"));
                let at = lines.next()?;
                let what = lines.next().unwrap_or_default();
                Some(format!("node {id}: {at} {what}"))
            })
            .collect()
    }

    /// Fails if a node exited without being told to.
    fn check_crashes(&mut self) -> anyhow::Result<()> {
        let crashes = self.cluster.take_crashes();
        if crashes.is_empty() {
            return Ok(());
        }
        bail!("nodes exited on their own: {crashes:?}")
    }

    /// Prints a line stamped with the run's elapsed and wall-clock time,
    /// and appends it to every node's log.
    fn say(&self, line: String) {
        let stamped = format!(
            "[nemesis {:7.2}s {}] {line}",
            self.started.elapsed().as_secs_f64(),
            utc_time_of_day()
        );
        println!("{stamped}");
        for id in self.cluster.node_ids() {
            if let Some(path) = node_log(&self.cluster, id) {
                let file = std::fs::OpenOptions::new().append(true).open(path);
                if let Ok(mut f) = file {
                    let _ = writeln!(f, "=== {stamped} ===");
                }
            }
        }
        self.lines.lock().expect("lines lock").push(stamped);
    }

    /// Panics with the seed, the error, crashes and panics found, the
    /// load's progress and the steps so far. The cluster is still alive, so
    /// its drop prints the nodes' logs and keeps its directory.
    fn fail(&mut self, e: anyhow::Error) -> ! {
        let e = match self.check_crashes() {
            Err(crashes) => e.context(crashes),
            Ok(()) => e,
        };
        let panics = self.panics_in_logs();
        let e = if panics.is_empty() {
            e
        } else {
            e.context(format!("panics in node logs: {panics:?}"))
        };
        let progress = self
            .load
            .as_ref()
            .map_or_else(|| "not running".to_string(), Load::progress);
        panic!(
            "nemesis seed = {seed} failed (rerun with COVET_NEMESIS_SEED={seed}): {e:#}\n\
             load: {progress}\nsteps:\n{}",
            self.lines.lock().expect("lines lock").join("\n"),
            seed = self.config.seed,
        );
    }
}

/// A client call bounded by [`CLIENT_CALL_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = covet_client::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CLIENT_CALL_TIMEOUT, call)
        .await
        .map_err(|_| anyhow!("no answer within {CLIENT_CALL_TIMEOUT:?}"))?
        .map_err(anyhow::Error::from)
}

/// Each group with a leader, as that leader reports it (the newest term
/// wins over a deposed leader that has not heard yet), and the number of
/// groups any node holds.
async fn group_leaders(client: &Client) -> Option<(BTreeMap<u64, GroupStatus>, usize)> {
    let views = tokio::time::timeout(CALL_TIMEOUT, client.cluster_status())
        .await
        .ok()?
        .ok()?;
    let mut leaders: BTreeMap<u64, GroupStatus> = BTreeMap::new();
    let mut all = BTreeSet::new();
    for g in views.iter().flat_map(|v| v.groups.iter()) {
        all.insert(g.group);
        let newer = leaders.get(&g.group).is_none_or(|cur| g.term > cur.term);
        if g.role == "leader" && newer {
            leaders.insert(g.group, g.clone());
        }
    }
    Some((leaders, all.len()))
}

/// A node's log file: `stderr.log` beside its data dir (see `node`).
fn node_log(cluster: &Cluster, id: NodeId) -> Option<PathBuf> {
    Some(cluster.data_dir(id).ok()?.parent()?.join("stderr.log"))
}

/// `HH:MM:SS.mmm` in UTC, as the nodes' log lines stamp it.
fn utc_time_of_day() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}
