//! Power cuts, on real nodes whose data dirs sit on the power-loss
//! filesystem (`covet-powerfs`): at a cut every directory entry a node had
//! not synced is gone, and its unsynced writes are lost, or land torn, or
//! land in part and out of order (chosen by a printed seed). Each scenario runs
//! under steady produce load with a consumer per partition and ends with
//! the checker (lost, duplicated, out of order, replica identity). After
//! every restart each cut node's recovered Raft state is held to what it
//! had vouched for before the cut (see `covet_cluster_tests::power`): it
//! never granted a vote or acknowledged an append it had not synced.
//!
//! Scenarios run one at a time (a process-wide lock). Fixed durations are
//! fault windows, never waits for something to happen.

use std::time::Duration;

use bytes::Bytes;
use covet_client::{Client, ProducerConfig, Record, TopicSpec};
use covet_cluster_tests::power::Witness;
use covet_cluster_tests::read::{read_partition, ReadEnd, Source};
use covet_cluster_tests::{every_group, wait_until, Cluster, Load, LoadConfig, NodeId};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

const TOPIC: &str = "events";
const WARMUP_ACKS: u64 = 300;
const TAIL_ACKS: u64 = 600;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A powered cluster under load, watched by a witness.
struct PowerScenario {
    name: &'static str,
    cluster: Cluster,
    load: Option<Load>,
    witness: Witness,
    /// Seed of the cuts' torn writes, printed so a failure reproduces.
    seed: u64,
    cuts: u64,
    discarded: u64,
}

impl PowerScenario {
    async fn start(name: &'static str, n: usize, extra: &[&str]) -> PowerScenario {
        let seed = std::env::var("COVET_POWER_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| covet_protocol::now_ms() as u64);
        println!("{name}: power cut seed = {seed}");
        let cluster = Cluster::start_powered(n, extra)
            .await
            .unwrap_or_else(|e| panic!("{name}: starting the cluster: {e:#}"));
        let witness = Witness::start(
            cluster
                .node_ids()
                .into_iter()
                .map(|id| (id, cluster.client_addr(id).expect("addr").to_string()))
                .collect(),
        );
        PowerScenario {
            name,
            cluster,
            load: None,
            witness,
            seed,
            cuts: 0,
            discarded: 0,
        }
    }

    /// Starts the load and waits for its warm-up.
    async fn load(&mut self, replication_factor: u32) {
        let config = LoadConfig {
            topic: TOPIC.into(),
            replication_factor,
            ..LoadConfig::default()
        };
        let load = Load::start(&self.cluster, config)
            .await
            .unwrap_or_else(|e| panic!("{}: starting the load: {e:#}", self.name));
        load.wait_acked(WARMUP_ACKS, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{}: warm-up: {e:#}", self.name));
        self.load = Some(load);
    }

    fn fail(&self, what: &str, e: anyhow::Error) -> ! {
        let progress = self.load.as_ref().map(|l| l.progress()).unwrap_or_default();
        panic!(
            "{}: {what}: {e:#} (seed {})\nload: {progress}",
            self.name, self.seed
        );
    }

    /// Cuts the power of `ids` at once, restarts them, and checks what they
    /// recovered against what they had vouched for.
    async fn cut_and_restart(&mut self, ids: &[NodeId]) {
        self.cut_and_restart_only(ids, ids).await;
    }

    /// Cuts `ids`, restarts the `restart` among them (a node no group
    /// counts as a member would never be ready), and checks those.
    async fn cut_and_restart_only(&mut self, ids: &[NodeId], restart: &[NodeId]) {
        if let Some(load) = &self.load {
            load.mark_fault();
        }
        let before: Vec<_> = ids.iter().map(|&id| (id, self.witness.of(id))).collect();
        self.cuts += 1;
        let seed = self.seed.wrapping_add(self.cuts);
        let stats = match self.cluster.power_cut(ids, seed).await {
            Ok(s) => s,
            Err(e) => self.fail("power cut", e),
        };
        for (id, s) in &stats {
            println!("{}: power cut of node {id}: {s:?}", self.name);
            self.discarded += s.bytes_discarded + s.dir_changes_reverted;
        }
        for &id in ids {
            self.witness.forget(id);
        }
        if let Err(e) = self.cluster.restart_many(restart).await {
            self.fail("restart after the cut", e);
        }
        for (id, said) in before.into_iter().filter(|(id, _)| restart.contains(id)) {
            match Witness::check_recovery(&self.cluster, id, &said) {
                Ok(problems) if problems.is_empty() => {}
                Ok(problems) => self.fail(
                    "a node vouched for state it had not synced",
                    anyhow::anyhow!("{}", problems.join("\n")),
                ),
                Err(e) => self.fail("reading the recovery log", e),
            }
        }
    }

    fn assert_no_panic(&self) {
        let panics = self.cluster.panics();
        assert!(panics.is_empty(), "{}: {}", self.name, panics.join("\n"));
    }

    async fn leader_of(&self, partition: u32) -> NodeId {
        match self
            .cluster
            .wait_leader(TOPIC, partition, TIMEOUT, |_| true)
            .await
        {
            Ok(l) => l,
            Err(e) => self.fail("leader", e),
        }
    }

    /// Tail, checker, and no panic in any node's log.
    async fn finish(mut self) {
        let name = self.name;
        assert!(
            self.discarded > 0,
            "{name}: no cut discarded anything: the scenario proved nothing"
        );
        let load = self.load.take().expect("load started");
        if let Err(e) = load.wait_acked(TAIL_ACKS, TIMEOUT).await {
            panic!(
                "{name}: tail: {e:#} (seed {})\nload: {}",
                self.seed,
                load.progress()
            );
        }
        self.assert_no_panic();
        match load.finish(&mut self.cluster, name).await {
            Ok(report) => report.print_and_assert(),
            Err(e) => panic!("{name}: checking: {e:#} (seed {})", self.seed),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_cut_mid_stream() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_lone_node", 1, &[]).await;
    s.load(1).await;
    s.cut_and_restart(&[1]).await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_follower_of_three_cut() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_follower", 3, &[]).await;
    s.load(3).await;
    let leader = s.leader_of(0).await;
    let follower = s
        .cluster
        .node_ids()
        .into_iter()
        .find(|&n| n != leader)
        .expect("a follower");
    s.cut_and_restart(&[follower]).await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_cut() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_leader", 3, &[]).await;
    s.load(3).await;
    let leader = s.leader_of(0).await;
    s.cut_and_restart(&[leader]).await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_cut_at_once() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_all", 3, &[]).await;
    s.load(3).await;
    s.cut_and_restart(&[1, 2, 3]).await;
    s.finish().await;
}

/// A membership change is applied, then every node loses power. The
/// change must hold after the restart: its conf state was synced before
/// the applied index that covers it could reach sled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_right_after_remove_node_and_after_add_node() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_membership", 3, &[]).await;
    s.load(3).await;
    let client = Client::connect(&s.cluster.client_addrs())
        .await
        .expect("client");
    let meta = s.cluster.metadata_leader().await.expect("metadata leader");
    let victim = s
        .cluster
        .node_ids()
        .into_iter()
        .find(|&n| Some(n) != meta)
        .expect("a follower");
    client
        .change_membership(false, victim)
        .await
        .expect("remove-node");
    let gone = wait_until(TIMEOUT, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| g.replicas.iter().all(|r| r.node != victim))
    })
    .await;
    if let Err(e) = gone {
        s.fail("removal reaching every group", e);
    }
    // Long enough for sled's background flush (200 ms) to carry the
    // applied index past the change: the window the bug needed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let members: Vec<NodeId> = s
        .cluster
        .node_ids()
        .into_iter()
        .filter(|&n| n != victim)
        .collect();
    s.cut_and_restart_only(&[1, 2, 3], &members).await;
    let still_gone = wait_until(TIMEOUT, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| g.replicas.iter().all(|r| r.node != victim))
    })
    .await;
    if let Err(e) = still_gone {
        s.fail(
            &format!("node {victim} is back in a group after the cut: the removal was lost"),
            e,
        );
    }

    let added = wait_until(TIMEOUT, || async {
        client.change_membership(true, victim).await.ok()
    })
    .await;
    if let Err(e) = added {
        s.fail("add-node", e);
    }
    if let Err(e) = s.cluster.restart(victim).await {
        s.fail("restarting the re-added node", e);
    }
    let back = wait_until(TIMEOUT, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| {
            g.replicas.iter().any(|r| r.node == victim && r.matched > 0)
        })
    })
    .await;
    if let Err(e) = back {
        s.fail("the re-added node catching up", e);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.cut_and_restart(&[1, 2, 3]).await;
    let still_back = wait_until(TIMEOUT, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| {
            g.replicas.iter().any(|r| r.node == victim && r.matched > 0)
        })
    })
    .await;
    if let Err(e) = still_back {
        s.fail(&format!("node {victim} left a group after the cut"), e);
    }
    s.finish().await;
}

/// Writes `n` records of about 1 KiB to partition 0 of `topic`, each acked.
async fn write_trimmed(client: &Client, topic: &str, from: u64, n: u64) -> Vec<(u64, Bytes)> {
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        max_batch_bytes: 8 * 1024,
        ..ProducerConfig::default()
    });
    let mut deliveries = Vec::new();
    for i in from..from + n {
        let value = Bytes::from(format!("{i:06}:{}", "v".repeat(1000)));
        let record = Record {
            value: value.clone(),
            ..Record::default()
        };
        deliveries.push((
            producer.send_to(topic, 0, record).await.expect("send"),
            value,
        ));
    }
    producer.flush().await.expect("flush");
    let mut acked = Vec::new();
    for (d, value) in deliveries {
        let meta = tokio::time::timeout(TIMEOUT, d)
            .await
            .expect("ack in time")
            .expect("acked");
        acked.push((meta.offset, value));
    }
    acked
}

/// Every replica serves the same records from the newest start offset
/// among them to the end, and every acknowledged record at or after that
/// start is there.
async fn check_retained(cluster: &Cluster, client: &Client, topic: &str, acked: &[(u64, Bytes)]) {
    let until = acked.iter().map(|(o, _)| o + 1).max().unwrap_or(0);
    let mut per_replica = Vec::new();
    for id in cluster.node_ids() {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let read = read_partition(client, Source::Replica(id), topic, 0, until, deadline).await;
        assert_eq!(
            read.end,
            ReadEnd::Complete,
            "reading node {id}'s replica up to {until}: {:?}",
            read.last_error
        );
        let start = read.records.first().map_or(until, |r| r.offset);
        for (i, r) in read.records.iter().enumerate() {
            assert_eq!(r.offset, start + i as u64, "node {id}: contiguous offsets");
        }
        let values: Vec<Bytes> = read.records.iter().map(|r| r.value.clone()).collect();
        per_replica.push((id, (start, values)));
    }
    let start = per_replica.iter().map(|(_, (s, _))| *s).max().unwrap_or(0);
    let slice = |(s, v): &(u64, Vec<Bytes>)| v[(start - s) as usize..(until - s) as usize].to_vec();
    let first = slice(&per_replica[0].1);
    for (id, r) in &per_replica[1..] {
        assert_eq!(
            slice(r),
            first,
            "node {id}'s retained records differ from node {}'s",
            per_replica[0].0
        );
    }
    for (offset, value) in acked.iter().filter(|(o, _)| *o >= start) {
        assert_eq!(
            &first[(offset - start) as usize],
            value,
            "acknowledged offset {offset}"
        );
    }
}

/// Powered nodes compacting often: small segments, retention checked every
/// 20 ms.
const TRIMMING: [&str; 4] = ["--segment-bytes", "16384", "--retention-check-ms", "20"];

/// A client, and topic `trimmed`: one partition on every node, 64 KiB kept.
async fn trimmed_topic(cluster: &Cluster) -> Client {
    let client = Client::connect(&cluster.client_addrs())
        .await
        .expect("client");
    let mut spec = TopicSpec::new("trimmed").partitions(1);
    spec.replication_factor = 3;
    spec.retention_bytes = Some(64 * 1024);
    client.create_topic(spec).await.expect("create");
    cluster
        .wait_leader("trimmed", 0, TIMEOUT, |_| true)
        .await
        .expect("leader");
    client
}

/// Retention compacts the log every 100 ms while nodes lose power: a cut
/// during a compaction must leave a log that opens and holds every
/// acknowledged record still retained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_during_retention_compaction() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_retention", 3, &TRIMMING).await;
    let client = trimmed_topic(&s.cluster).await;
    let mut acked = write_trimmed(&client, "trimmed", 0, 400).await;
    for round in 0..3u64 {
        let leader = s
            .cluster
            .wait_leader("trimmed", 0, TIMEOUT, |_| true)
            .await
            .expect("leader");
        // Alternate: a follower, then the leader, then everyone.
        let victims: Vec<NodeId> = match round {
            0 => vec![s
                .cluster
                .node_ids()
                .into_iter()
                .find(|&n| n != leader)
                .expect("follower")],
            1 => vec![leader],
            _ => s.cluster.node_ids(),
        };
        let writer = {
            let client = client.clone();
            tokio::spawn(
                async move { write_trimmed(&client, "trimmed", 1000 * (round + 1), 200).await },
            )
        };
        // A moment into the writes (and so into compactions).
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.cut_and_restart(&victims).await;
        acked.extend(writer.await.expect("writer"));
    }
    check_retained(&s.cluster, &client, "trimmed", &acked).await;
    assert!(s.discarded > 0, "no cut discarded anything");
    s.assert_no_panic();
}

/// A follower away while the leader compacts past it is brought back by a
/// snapshot; it loses power while installing it, and again right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_during_snapshot_install() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_snapshot", 3, &TRIMMING).await;
    let client = trimmed_topic(&s.cluster).await;
    let mut acked = write_trimmed(&client, "trimmed", 0, 100).await;
    let leader = s
        .cluster
        .wait_leader("trimmed", 0, TIMEOUT, |_| true)
        .await
        .expect("leader");
    let follower = s
        .cluster
        .node_ids()
        .into_iter()
        .find(|&n| n != leader)
        .expect("follower");
    s.cluster.kill9(follower).await.expect("kill");
    acked.extend(write_trimmed(&client, "trimmed", 1000, 600).await);
    for _ in 0..2 {
        // Back, and straight into catch-up by snapshot: cut it there.
        s.cluster.restart(follower).await.expect("restart");
        s.cut_and_restart(&[follower]).await;
        s.cluster.kill9(follower).await.expect("kill");
        acked.extend(write_trimmed(&client, "trimmed", 5000, 300).await);
    }
    s.cluster.restart(follower).await.expect("restart");
    let caught_up = wait_until(TIMEOUT, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| {
            g.replicas.iter().all(|r| r.lag == 0 && r.matched > 0)
        })
    })
    .await;
    if let Err(e) = caught_up {
        s.fail("the follower catching up", e);
    }
    check_retained(&s.cluster, &client, "trimmed", &acked).await;
    assert!(s.discarded > 0, "no cut discarded anything");
    s.assert_no_panic();
}

/// A node loses power moments after it started and acknowledged its first
/// records: the directories it created (its data dir, `groups/`, `state/`,
/// each group's) must already be durable in their parents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_right_after_the_first_records() {
    let _serial = SERIAL.lock().await;
    let mut s = PowerScenario::start("power_fresh_node", 1, &[]).await;
    let client = Client::connect(&s.cluster.client_addrs())
        .await
        .expect("client");
    let mut spec = TopicSpec::new("fresh").partitions(1);
    spec.replication_factor = 1;
    client.create_topic(spec).await.expect("create");
    s.cluster
        .wait_leader("fresh", 0, TIMEOUT, |_| true)
        .await
        .expect("leader");
    let acked = write_trimmed(&client, "fresh", 0, 50).await;
    drop(client);
    s.cut_and_restart(&[1]).await;
    let client = Client::connect(&s.cluster.client_addrs())
        .await
        .expect("client");
    check_retained(&s.cluster, &client, "fresh", &acked).await;
    assert!(s.discarded > 0, "no cut discarded anything");
    s.assert_no_panic();
}
