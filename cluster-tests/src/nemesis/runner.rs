//! Executing a schedule against a running cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use covet_client::{Client, GroupStatus};

use super::*;
use crate::checker::Report;
use crate::cluster::{Cluster, NodeId, CALL_TIMEOUT};
use crate::proxy::Mode;
use crate::workload::Load;
use crate::CLIENT_CALL_TIMEOUT;

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
        // Refused while the leader has not heard from a majority of what
        // would remain (just after a fault or an election): retried until
        // the deadline, as an operator would.
        let deadline = tokio::time::Instant::now() + RECOVERY_TIMEOUT;
        let voters = loop {
            match bounded(client.change_membership(false, node)).await {
                Ok(voters) => break voters,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    self.say(format!("  remove-node {node} refused, retrying: {e:#}"));
                    tokio::time::sleep(PROBE_EVERY).await;
                }
                Err(e) => return Err(e),
            }
        };
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
