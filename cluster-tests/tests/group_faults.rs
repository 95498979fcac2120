//! Consumer groups under faults on real 3-node clusters (issue 9): a
//! producer load (every acknowledgement recorded) and a group whose
//! members handle and acknowledge every record (every handling recorded),
//! while every node is asked to describe the group about every 100 ms.
//! The group checker (`covet_cluster_tests::group_check`) then requires
//! every acknowledged record handled at least once, committed offsets that
//! never move backwards on any node and never pass the high watermark, and
//! lag 0 on every node at the end; the record checker judges the load as
//! in the other scenarios. Each scenario prints both reports as JSON lines,
//! the group's with its redelivery count (run with `--nocapture`).
//!
//! - kill -9 of the coordinator's node (the metadata leader), then of a
//!   partition leader's node, each restarted;
//! - a power cut of every node (their unsynced writes lost) while the group
//!   consumes, its member dying with them: every commit a node had applied
//!   survives, nothing beyond what was acknowledged is committed, and a new
//!   member resumes from there.
//!
//! Restarted nodes are judged in full: a node refuses to describe groups
//! (`NOT_READY`) until it has replayed what its groups had committed, and
//! a round publishes its records before its commits.
//!
//! A narrower test: a member whose session was ended by a forced reset
//! consumes the partition again.
//!
//! Scenarios run one at a time (a process-wide lock); no fixed sleep: every
//! wait is for a condition, with a deadline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use covet_client::Client;
use covet_cluster_tests::group_check::{self, GroupReport, Handled, Sample};
use covet_cluster_tests::group_load::{self, HandledLog, Member, MemberConfig, Sampler};
use covet_cluster_tests::{wait_until, Cluster, Load, LoadConfig, NodeId};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

const TOPIC: &str = "orders";
const GROUP: &str = "g";
const PARTITIONS: u32 = 3;
/// Bound on every wait for progress or convergence.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A cluster, its load, the group's members and the sampler.
struct Run {
    name: &'static str,
    started: Instant,
    cluster: Cluster,
    load: Load,
    client: Client,
    sampler: Sampler,
    handled: HandledLog,
    members: Vec<Member>,
}

impl Run {
    async fn start(name: &'static str, cluster: Cluster) -> Run {
        let started = Instant::now();
        let config = LoadConfig {
            topic: TOPIC.into(),
            partitions: PARTITIONS,
            producers: 2,
            rate_per_producer: 100,
            ..LoadConfig::default()
        };
        let load = Load::start(&cluster, config)
            .await
            .unwrap_or_else(|e| panic!("{name}: starting the load: {e:#}"));
        let client = Client::connect(&cluster.client_addrs())
            .await
            .unwrap_or_else(|e| panic!("{name}: client: {e:#}"));
        let sampler = Sampler::start(client.clone(), cluster.node_ids(), GROUP);
        Run {
            name,
            started,
            cluster,
            load,
            client,
            sampler,
            handled: HandledLog::default(),
            members: Vec::new(),
        }
    }

    fn member_config(session_timeout: Duration) -> MemberConfig {
        MemberConfig {
            group: GROUP.into(),
            topics: vec![TOPIC.into()],
            session_timeout,
            max_in_flight: 100,
        }
    }

    fn fail(&self, what: &str, e: impl std::fmt::Display) -> ! {
        self.cluster.dump_logs(30);
        panic!(
            "{}: {what}: {e:#}\nload: {}\nhandled: {}, session errors: {:?}",
            self.name,
            self.load.progress(),
            self.handled.handlings(),
            self.handled.errors()
        );
    }

    fn handled(&self) -> Vec<Handled> {
        self.handled.handled()
    }

    /// Waits until `more` records were acknowledged to the producers and
    /// the group handled `more / PARTITIONS` more on every partition (so a
    /// partition whose leader was lost must have resumed), from now.
    async fn progress(&self, more: u64, what: &str) {
        let before = self.handled.per_partition();
        if let Err(e) = self.load.wait_acked(more, TIMEOUT).await {
            self.fail(&format!("producing {what}"), e);
        }
        let each = (more / u64::from(PARTITIONS)) as usize;
        let group = wait_until(TIMEOUT, || async {
            let now = self.handled.per_partition();
            (0..PARTITIONS)
                .all(|p| {
                    let was = before.get(&p).copied().unwrap_or(0);
                    now.get(&p).copied().unwrap_or(0) >= was + each
                })
                .then_some(())
        })
        .await;
        if let Err(e) = group {
            let now = self.handled.per_partition();
            self.fail(
                &format!("the group handling records on every partition {what}"),
                format!("{e:#}: per partition {before:?} then {now:?}"),
            );
        }
    }

    /// Kills `node` with -9; while it is down the load and the group must
    /// go on (one election, and a rebalance or session move); then
    /// restarts it, and they must go on again.
    async fn kill_and_restart(&mut self, node: NodeId, what: &str, coordinator: bool) {
        println!(
            "{}: {:?}: kill -9 of node {node} ({what})",
            self.name,
            self.started.elapsed()
        );
        self.load.mark_fault();
        self.sampler.restarting(node);
        if let Err(e) = self.cluster.kill9(node).await {
            self.fail("kill -9", e);
        }
        if coordinator {
            // A new coordinator first: the group goes on under it.
            let elected = wait_until(TIMEOUT, || async {
                let now = self.cluster.metadata_leader().await.ok().flatten()?;
                (now != node).then_some(now)
            })
            .await;
            match elected {
                Ok(n) => println!("{}: node {n} coordinates now", self.name),
                Err(e) => self.fail("electing a new coordinator", e),
            }
        }
        self.progress(100, &format!("while the {what}'s node is down"))
            .await;
        println!(
            "{}: {:?}: restarting node {node}",
            self.name,
            self.started.elapsed()
        );
        if let Err(e) = self.cluster.restart(node).await {
            self.fail("restart", e);
        }
        self.progress(100, &format!("after the {what}'s node restarted"))
            .await;
    }

    /// Stops producing, waits until the group handled every acknowledged
    /// record and every node shows lag 0, has the members leave, and
    /// judges the group (and then the load, with the record checker).
    async fn finish(mut self, mut other: Vec<String>) {
        if let Err(e) = self.load.stop_producers().await {
            self.fail("stopping the producers", e);
        }
        let acks = self.load.acks();
        let all = wait_until(TIMEOUT, || async {
            group_check::unhandled(&acks, &self.handled())
                .is_empty()
                .then_some(())
        })
        .await;
        if let Err(e) = all {
            // The report below says which.
            println!("{}: not every record handled: {e:#}", self.name);
        }
        let nodes = self.cluster.node_ids();
        let finals = final_answers(&self.client, &nodes).await;
        for m in std::mem::take(&mut self.members) {
            if let Err(e) = m.leave().await {
                other.push(format!("a member could not leave: {e:#}"));
            }
        }
        let samples = self.sampler.samples();
        let handled = self.handled();
        let mut report = GroupReport::analyse(
            self.name, &acks, &handled, &samples, &nodes, PARTITIONS, &finals,
        );
        report.other = other;
        println!(
            "{}: {} handlings of {} records acknowledged: {} redeliveries, {} session \
             errors {:?} ({:?})",
            self.name,
            report.handlings,
            report.acked,
            report.redeliveries,
            self.handled.errors().len(),
            self.handled.errors().iter().take(3).collect::<Vec<_>>(),
            self.started.elapsed()
        );
        report.print_and_assert();
        let panics = self.cluster.panics();
        assert!(panics.is_empty(), "{}: {}", self.name, panics.join("\n"));
        match self.load.finish(&mut self.cluster, self.name).await {
            Ok(r) => r.print_and_assert(),
            Err(e) => panic!("{}: checking the load: {e:#}", self.name),
        }
        println!("{}: done in {:?}", self.name, self.started.elapsed());
    }
}

/// Each node's answer once every node shows lag 0 on every partition, or
/// the last answers when that does not happen within [`TIMEOUT`].
async fn final_answers(client: &Client, nodes: &[NodeId]) -> Vec<Sample> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let mut finals = Vec::new();
        for &node in nodes {
            finals.extend(
                group_load::describe(client, node, GROUP)
                    .await
                    .unwrap_or_default(),
            );
        }
        let lagging = group_check::lagging(nodes, PARTITIONS, &finals);
        if lagging.is_empty() || tokio::time::Instant::now() >= deadline {
            return finals;
        }
        tokio::time::sleep(group_load::SAMPLE_EVERY).await;
    }
}

/// Per partition, the committed offset in `node`'s answer.
fn committed_on(node: NodeId, answers: &[Sample]) -> BTreeMap<u32, u64> {
    answers
        .iter()
        .filter(|s| s.node == node)
        .map(|s| (s.partition, s.committed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_through_the_kill_of_its_coordinator_and_of_a_partition_leader() {
    let _serial = SERIAL.lock().await;
    let name = "group_kills";
    let cluster = Cluster::start(3)
        .await
        .unwrap_or_else(|e| panic!("{name}: starting the cluster: {e:#}"));
    let mut run = Run::start(name, cluster).await;
    let seeds = run.cluster.client_addrs();
    // Two members; session timeouts long enough to ride out an election
    // and a restart.
    for _ in 0..2 {
        let config = Run::member_config(Duration::from_secs(8));
        run.members
            .push(Member::start(&seeds, config, run.handled.clone()));
    }
    run.progress(200, "before the faults").await;

    let coordinator = match run.cluster.metadata_leader().await {
        Ok(Some(n)) => n,
        Ok(None) => run.fail("finding the coordinator", "no metadata leader"),
        Err(e) => run.fail("finding the coordinator", e),
    };
    run.kill_and_restart(coordinator, "coordinator", true).await;

    // A partition leader's node, other than the coordinator's now when
    // some partition allows it, so that the second fault hits the group
    // sessions and not the coordinator again.
    let meta = run.cluster.metadata_leader().await.ok().flatten();
    let mut leaders = Vec::new();
    for p in 0..PARTITIONS {
        match run.cluster.wait_leader(TOPIC, p, TIMEOUT, |_| true).await {
            Ok(l) => leaders.push(l),
            Err(e) => run.fail("a partition leader", e),
        }
    }
    let leader = leaders
        .iter()
        .copied()
        .find(|&l| Some(l) != meta)
        .unwrap_or(leaders[0]);
    run.kill_and_restart(leader, "partition leader", false)
        .await;
    run.finish(Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_through_a_power_cut_of_every_node() {
    let _serial = SERIAL.lock().await;
    let name = "group_power_cut";
    let seed = std::env::var("COVET_POWER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| covet_protocol::now_ms() as u64);
    println!("{name}: power cut seed = {seed}");
    let cluster = Cluster::start_powered(3, &[])
        .await
        .unwrap_or_else(|e| panic!("{name}: starting the cluster: {e:#}"));
    let mut run = Run::start(name, cluster).await;
    let seeds = run.cluster.client_addrs();
    // The member dies with the power: on a runtime of its own, shut down at
    // the cut. Its session timeout bounds how long the new coordinator
    // waits for it before the next member gets its partitions.
    let session_timeout = Duration::from_secs(3);
    let first = Member::start_isolated(
        &seeds,
        Run::member_config(session_timeout),
        run.handled.clone(),
    )
    .unwrap_or_else(|e| panic!("{name}: member: {e:#}"));
    run.progress(300, "before the cut").await;
    // Something committed on every partition, so that "it survives"
    // means something.
    let committed = wait_until(TIMEOUT, || async {
        let top = group_check::highest_committed(&run.sampler.samples());
        (top.len() == PARTITIONS as usize && top.values().all(|&c| c > 0)).then_some(())
    })
    .await;
    if let Err(e) = committed {
        run.fail("a commit on every partition", e);
    }

    println!(
        "{name}: {:?}: power cut of every node",
        run.started.elapsed()
    );
    first.kill();
    run.load.mark_fault();
    let all = run.cluster.node_ids();
    for &n in &all {
        run.sampler.restarting(n);
    }
    let stats = match run.cluster.power_cut(&all, seed).await {
        Ok(s) => s,
        Err(e) => run.fail("power cut", e),
    };
    let discarded: u64 = stats
        .iter()
        .map(|(_, s)| s.bytes_discarded + s.dir_changes_reverted)
        .sum();
    println!("{name}: the cut discarded {discarded} bytes and directory changes");
    // Every node is down: these are all the answers given before the cut,
    // and these all the handlings (the member is gone).
    let applied_before = group_check::highest_committed(&run.sampler.samples());
    let acked_prefix = group_check::handled_prefix(&run.handled());
    if let Err(e) = run.cluster.restart_many(&all).await {
        run.fail("restart after the cut", e);
    }

    // Before any member resumes, every node must come back to every
    // commit applied before the cut, and none may show more than was
    // acknowledged.
    let mut other = Vec::new();
    let back = wait_until(TIMEOUT, || async {
        let mut answers = Vec::new();
        for &node in &all {
            answers.extend(group_load::describe(&run.client, node, GROUP).await?);
        }
        all.iter()
            .all(|&n| {
                let after = committed_on(n, &answers);
                group_check::commits_after_restart(&applied_before, &acked_prefix, &after)
                    .is_empty()
            })
            .then_some(answers)
    })
    .await;
    let answers = match back {
        Ok(a) => a,
        Err(_) => {
            let mut answers = Vec::new();
            for &node in &all {
                answers.extend(
                    group_load::describe(&run.client, node, GROUP)
                        .await
                        .unwrap_or_default(),
                );
            }
            answers
        }
    };
    for &n in &all {
        let after = committed_on(n, &answers);
        for problem in group_check::commits_after_restart(&applied_before, &acked_prefix, &after) {
            other.push(format!("node {n}: {problem}"));
        }
    }
    println!(
        "{name}: committed before the cut {applied_before:?}, acknowledged up to \
         {acked_prefix:?}, after the restart {:?}",
        all.iter()
            .map(|&n| (n, committed_on(n, &answers)))
            .collect::<Vec<_>>()
    );

    let handled_before = run.handled.handlings();
    run.members.push(Member::start(
        &seeds,
        Run::member_config(Duration::from_secs(8)),
        run.handled.clone(),
    ));
    run.progress(200, "after the restart").await;
    // The new member started every partition where the group's commits
    // left off: at or after the last commit seen, and no further than
    // what was acknowledged before the cut (a commit proposed before the
    // cut may be applied only after the restart).
    let resumed = run.handled()[handled_before..].to_vec();
    other.extend(group_check::resumed_at_committed(
        &group_check::highest_committed(&answers),
        &acked_prefix,
        &resumed,
    ));
    assert!(
        discarded > 0,
        "{name}: the cut discarded nothing: the scenario proved nothing"
    );
    run.finish(other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_session_was_ended_consumes_the_partition_again() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(1).await.expect("cluster");
    let client = Client::connect(&cluster.client_addrs())
        .await
        .expect("client");
    let mut spec = covet_client::TopicSpec::new(TOPIC).partitions(1);
    spec.replication_factor = 1;
    client.create_topic(spec).await.expect("create topic");
    cluster
        .wait_leader(TOPIC, 0, TIMEOUT, |_| true)
        .await
        .expect("leader");
    let producer = client.producer(covet_client::ProducerConfig::default());
    let publish = |from: u64, to: u64| {
        let producer = &producer;
        async move {
            for i in from..to {
                let record = covet_client::Record {
                    value: format!("r{i}").into(),
                    ..Default::default()
                };
                drop(producer.send_to(TOPIC, 0, record).await.expect("send"));
            }
            tokio::time::timeout(TIMEOUT, producer.flush())
                .await
                .expect("flushed in time")
                .expect("flushed");
        }
    };
    publish(0, 10).await;
    let log = HandledLog::default();
    let member = Member::start(
        &cluster.client_addrs(),
        Run::member_config(Duration::from_secs(8)),
        log.clone(),
    );
    let handled_at_least = |n: usize| {
        let log = log.clone();
        async move {
            wait_until(TIMEOUT, || async { (log.handlings() >= n).then_some(()) })
                .await
                .is_ok()
        }
    };
    assert!(handled_at_least(10).await, "the first 10 never handled");
    // Every acknowledgement committed, so the reset has something to undo.
    let committed = wait_until(TIMEOUT, || async {
        let d = client.describe_group(GROUP).await.ok()?;
        d.partitions.iter().all(|p| p.committed == 10).then_some(())
    })
    .await;
    assert!(
        committed.is_ok(),
        "the acknowledgements were never committed"
    );
    client
        .reset_group(
            GROUP,
            TOPIC,
            None,
            covet_client::StartPosition::Earliest,
            true,
        )
        .await
        .expect("forced reset");
    publish(10, 15).await;
    // 10 again from the start, and 5 new ones.
    let again = handled_at_least(25).await;
    assert!(
        again,
        "after the forced reset the member handled {} records in all (25 expected); session \
         errors: {:?}",
        log.handlings(),
        log.errors()
    );
    member.leave().await.expect("leave");
}
