//! Fault scenarios on real 3-node clusters, each under steady produce load
//! with a consumer per partition. Every scenario ends with the checker
//! (`Report::assert_clean`) and requires: lost = 0, duplicated = 0, out of
//! order = 0, replicas identical up to the leader's commit (every assigned
//! replica serving reads, every replica at lag 0 at the end), consumers
//! saw only committed records with contiguous offsets, every send was
//! answered, no node crashed or logged `panicked at`, and a produce
//! succeeded on every partition after every fault. Each prints its report
//! as one JSON line (run with `--nocapture` to see them).
//!
//! Scenarios run one at a time (a process-wide lock), whatever the test
//! thread count: two clusters of debug builds on two cores would slow each
//! other past their election timeouts. Fixed durations below are fault
//! windows (how long a node stays down, paused or cut off), never waits for
//! something to happen: those poll a condition with a deadline.

use std::time::Duration;

use covet_cluster_tests::{Cluster, Load, LoadConfig, NodeId};
use tokio::sync::Mutex;

/// The topic every scenario loads.
const TOPIC: &str = "events";

/// Serialises the scenarios.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// The brokers' election timeout (10 ticks of 100 ms).
const ELECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Records acknowledged before the fault.
const WARMUP_ACKS: u64 = 300;
/// Records acknowledged after the last fault step before the run ends.
const TAIL_ACKS: u64 = 600;
/// Bound on warm-up, recovery and the tail.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed node stays down, a paused node paused, or a
/// partitioned node cut off.
const FAULT_WINDOW: Duration = Duration::from_secs(3);

/// A cluster with its load; panics (printing every node's log tail) when
/// anything fails.
struct Scenario {
    name: &'static str,
    cluster: Cluster,
    load: Load,
}

impl Scenario {
    async fn start(name: &'static str) -> Scenario {
        let cluster = match Cluster::start(3).await {
            Ok(c) => c,
            Err(e) => panic!("{name}: starting the cluster: {e:#}"),
        };
        let config = LoadConfig {
            topic: TOPIC.into(),
            ..LoadConfig::default()
        };
        let load = match Load::start(&cluster, config).await {
            Ok(l) => l,
            Err(e) => panic!("{name}: starting the load: {e:#}"),
        };
        let mut s = Scenario {
            name,
            cluster,
            load,
        };
        s.check(|s| Box::pin(s.load.wait_acked(WARMUP_ACKS, RECOVERY_TIMEOUT)))
            .await;
        s
    }

    fn topic(&self) -> &'static str {
        TOPIC
    }

    /// Runs a step; on error panics while the cluster is alive, so its drop
    /// prints the logs.
    async fn check<F>(&mut self, step: F)
    where
        F: for<'a> FnOnce(
            &'a mut Scenario,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'a>,
        >,
    {
        let name = self.name;
        if let Err(e) = step(self).await {
            panic!("{name}: {e:#}\nload: {}", self.load.progress());
        }
    }

    /// Stops the load, checks, prints the report and asserts on it.
    async fn finish(self) {
        let Scenario {
            name,
            mut cluster,
            load,
        } = self;
        if let Err(e) = load.wait_acked(TAIL_ACKS, RECOVERY_TIMEOUT).await {
            panic!("{name}: tail: {e:#}\nload: {}", load.progress());
        }
        match load.finish(&mut cluster, name).await {
            Ok(report) => report.print_and_assert(),
            Err(e) => panic!("{name}: checking: {e:#}"),
        }
    }
}

/// Keeps a fault in place for `window` (a scenario's shape, not a wait).
async fn hold(window: Duration) {
    tokio::time::sleep(window).await;
}

/// The partitions `node` leads, per the majority's view.
async fn led_by(cluster: &Cluster, topic: &str, node: NodeId) -> anyhow::Result<Vec<u32>> {
    let mut led = Vec::new();
    for p in 0..LoadConfig::default().partitions {
        if cluster.leader_of(topic, p).await? == Some(node) {
            led.push(p);
        }
    }
    Ok(led)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_of_partitions_and_metadata_then_restart() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::start("kill9_leader").await;
    s.check(|s| {
        Box::pin(async move {
            let topic = s.topic();
            // The metadata leader normally leads a partition too (leaders
            // are spread over the nodes); wait for a moment when it does,
            // so one kill takes both.
            let (victim, led) = covet_cluster_tests::wait_until(RECOVERY_TIMEOUT, || async {
                let meta = s.cluster.metadata_leader().await.ok().flatten()?;
                let led = led_by(&s.cluster, topic, meta).await.ok()?;
                (!led.is_empty()).then_some((meta, led))
            })
            .await
            .map_err(|e| e.context("no metadata leader that also leads a partition"))?;
            eprintln!("kill -9 node {victim}: metadata leader, leads partitions {led:?}");
            s.load.mark_fault();
            s.cluster.kill9(victim).await?;
            // It was the leader we claimed: every group it led elects
            // another node, seen by the majority of the whole cluster.
            for &p in &led {
                s.cluster
                    .wait_leader(topic, p, RECOVERY_TIMEOUT, |l| l != victim)
                    .await?;
            }
            covet_cluster_tests::wait_until(RECOVERY_TIMEOUT, || async {
                let meta = s.cluster.metadata_leader().await.ok().flatten()?;
                (meta != victim).then_some(())
            })
            .await
            .map_err(|e| e.context(format!("the metadata group kept node {victim} as leader")))?;
            s.load.wait_recovered(RECOVERY_TIMEOUT).await?;
            hold(FAULT_WINDOW).await;
            s.cluster.restart(victim).await
        })
    })
    .await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_leader_past_election_timeout_then_sigcont() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::start("sigstop_leader").await;
    s.check(|s| {
        Box::pin(async move {
            let topic = s.topic();
            let victim = s
                .cluster
                .wait_leader(topic, 0, RECOVERY_TIMEOUT, |_| true)
                .await?;
            s.load.mark_fault();
            let stopped = tokio::time::Instant::now();
            s.cluster.stop_signal(victim).await?;
            let new = s
                .cluster
                .wait_leader(topic, 0, RECOVERY_TIMEOUT, |l| l != victim)
                .await?;
            s.load.wait_recovered(RECOVERY_TIMEOUT).await?;
            // Paused well past the election timeout, whatever recovery took.
            tokio::time::sleep_until(stopped + FAULT_WINDOW.max(3 * ELECTION_TIMEOUT)).await;
            s.cluster.cont(victim).await?;
            // The old leader learns of the newer term and steps down.
            covet_cluster_tests::wait_until(RECOVERY_TIMEOUT, || async {
                let view = s.cluster.node_view_of_leader(victim, topic, 0).await;
                view.ok().flatten().filter(|&l| l != victim)
            })
            .await
            .map_err(|e| {
                e.context(format!(
                    "node {victim} still names itself leader (new: {new})"
                ))
            })?;
            Ok(())
        })
    })
    .await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leader_from_majority_then_heal() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::start("partition_leader").await;
    s.check(|s| {
        Box::pin(async move {
            let topic = s.topic();
            let victim = s
                .cluster
                .wait_leader(topic, 0, RECOVERY_TIMEOUT, |_| true)
                .await?;
            s.load.mark_fault();
            s.cluster.partition(victim);
            s.cluster
                .wait_leader(topic, 0, RECOVERY_TIMEOUT, |l| l != victim)
                .await?;
            s.load.wait_recovered(RECOVERY_TIMEOUT).await?;
            hold(FAULT_WINDOW).await;
            s.cluster.heal();
            // The isolated node rejoins and follows the majority's leader.
            let cluster = &s.cluster;
            covet_cluster_tests::wait_until(RECOVERY_TIMEOUT, || async move {
                let leader = cluster.leader_of(topic, 0).await.ok().flatten()?;
                let view = cluster.node_view_of_leader(victim, topic, 0).await.ok()??;
                (view == leader).then_some(())
            })
            .await
            .map_err(|e| e.context(format!("node {victim} did not rejoin after heal")))
        })
    })
    .await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_all_nodes_then_restart_them() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::start("kill9_all").await;
    s.check(|s| {
        Box::pin(async move {
            let all = s.cluster.node_ids();
            s.load.mark_fault();
            s.cluster.kill9_many(&all).await?;
            hold(FAULT_WINDOW).await;
            // All at once: none can be ready without a majority.
            s.cluster.restart_many(&all).await?;
            s.load.wait_recovered(RECOVERY_TIMEOUT).await?;
            Ok(())
        })
    })
    .await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_node() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::start("rolling_restart").await;
    s.check(|s| {
        Box::pin(async move {
            for id in s.cluster.node_ids() {
                s.load.mark_fault();
                let status = s.cluster.terminate(id).await?;
                anyhow::ensure!(
                    status.success(),
                    "node {id} exited with {status} on SIGTERM"
                );
                s.cluster.restart(id).await?;
                s.load.wait_recovered(RECOVERY_TIMEOUT).await?;
                s.load.wait_acked(WARMUP_ACKS, RECOVERY_TIMEOUT).await?;
            }
            Ok(())
        })
    })
    .await;
    s.finish().await;
}

/// A wiped node must come back as a new member: stopping, wiping and
/// restarting it under the same id would let it vote again in terms it
/// already voted in (its hard state is gone), which Raft does not allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_is_re_added_and_caught_up() {
    let _serial = SERIAL.lock().await;
    let mut s = Scenario::start("wiped_node").await;
    s.check(|s| {
        Box::pin(async move {
            let topic = s.topic();
            let leader = s
                .cluster
                .wait_leader(topic, 0, RECOVERY_TIMEOUT, |_| true)
                .await?;
            let victim = s
                .cluster
                .node_ids()
                .into_iter()
                .find(|&id| id != leader)
                .ok_or_else(|| anyhow::anyhow!("no follower"))?;
            s.load.mark_fault();
            s.cluster.kill9(victim).await?;
            s.cluster.wipe(victim)?;
            // A node that lost its disk lost its votes too: it leaves the
            // configuration and comes back as a new member.
            let client = covet_client::Client::connect(&s.cluster.client_addrs()).await?;
            client.change_membership(false, victim).await?;
            covet_cluster_tests::wait_until(RECOVERY_TIMEOUT, || async {
                let views = client.cluster_status().await.ok()?;
                covet_cluster_tests::every_group(&views, |g| {
                    g.replicas.iter().all(|r| r.node != victim)
                })
            })
            .await
            .map_err(|e| e.context(format!("node {victim} still a replica somewhere")))?;
            client.change_membership(true, victim).await?;
            s.cluster.restart(victim).await?;
            let restarted = std::time::Instant::now();
            // Caught up: in every group it holds everything committed (its
            // match index reaches the leader's commit). Under load a lag of
            // a few in-flight entries stays; lag 0 for every replica is
            // required once the load stops (`Load::finish`).
            covet_cluster_tests::wait_until(RECOVERY_TIMEOUT, || async {
                let views = client.cluster_status().await.ok()?;
                covet_cluster_tests::every_group(&views, |g| {
                    g.replicas.iter().any(|r| {
                        r.node == victim && r.state == "replicate" && r.matched >= g.commit
                    })
                })
            })
            .await
            .map_err(|e| {
                e.context(format!(
                    "node {victim} did not catch up with every group's commit"
                ))
            })?;
            eprintln!(
                "node {victim} caught up with every group's commit {:?} after its restart",
                restarted.elapsed()
            );
            Ok(())
        })
    })
    .await;
    s.finish().await;
}
