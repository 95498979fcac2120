//! Consumer groups on a real 3-node cluster: the coordinator (the metadata
//! leader) is killed with -9 and the group goes on under the new one, the
//! members keeping their ids and partitions; a member that then goes
//! silent times out and the other takes its partitions. Members consume
//! through a partition leader's kill and through the kill of every node;
//! a member killed with -9 mid-stream hands its unacknowledged records to
//! the survivor, and none is lost.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covet_client::{Client, TopicSpec};
use covet_cluster_tests::Cluster;
use covet_protocol::api::MemberAssignment;

/// One cluster at a time: two on two cores slow each other past their
/// election timeouts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOPIC: &str = "work";
const PARTITIONS: u32 = 6;
const CONVERGE: Duration = Duration::from_secs(20);

type Owned = Vec<(String, u32)>;

fn held(a: &MemberAssignment) -> Owned {
    a.partitions
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect()
}

/// Heartbeats as member `id`, reporting what each answer grants (a member
/// that opens and closes its sessions at once), until `done` holds.
async fn heartbeat_until(
    client: &Client,
    id: &str,
    mut owned: Owned,
    done: impl Fn(&MemberAssignment) -> bool,
) -> MemberAssignment {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        if let Ok(a) = client.heartbeat("g", id, &owned).await {
            if done(&a) {
                return a;
            }
            owned = held(&a);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "member {id} did not converge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 3-node cluster with the topic replicated on every node, each of its
/// partitions led, and a client.
async fn setup(partitions: u32) -> (Cluster, Client) {
    let cluster = Cluster::start(3).await.expect("cluster");
    let client = Client::connect(&cluster.client_addrs())
        .await
        .expect("client");
    client
        .create_topic(TopicSpec {
            replication_factor: 3,
            ..TopicSpec::new(TOPIC).partitions(partitions)
        })
        .await
        .expect("create topic");
    for p in 0..partitions {
        cluster
            .wait_leader(TOPIC, p, CONVERGE, |_| true)
            .await
            .expect("partition leader");
    }
    (cluster, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_survives_the_loss_of_its_coordinator() {
    let _one = SERIAL.lock().await;
    let (mut cluster, client) = setup(PARTITIONS).await;
    let topics = vec![TOPIC.to_string()];
    // Session timeouts long enough to ride out an election.
    let a = client
        .join_group("g", &topics, 8_000)
        .await
        .expect("join a");
    let b = client
        .join_group("g", &topics, 8_000)
        .await
        .expect("join b");
    let a_half =
        heartbeat_until(&client, &a.member_id, held(&a), |x| x.partitions.len() == 3).await;
    client
        .heartbeat("g", &a.member_id, &held(&a_half))
        .await
        .expect("a releases");
    let b_half = heartbeat_until(&client, &b.member_id, vec![], |x| x.partitions.len() == 3).await;

    let coordinator = cluster
        .metadata_leader()
        .await
        .expect("views")
        .expect("a metadata leader");
    cluster
        .kill9(coordinator)
        .await
        .expect("kill the coordinator");
    // The new coordinator knows both members and what they hold.
    let a_after = heartbeat_until(&client, &a.member_id, held(&a_half), |_| true).await;
    let b_after = heartbeat_until(&client, &b.member_id, held(&b_half), |_| true).await;
    assert_ne!(
        cluster.metadata_leader().await.ok().flatten(),
        Some(coordinator)
    );
    assert_eq!(held(&a_after), held(&a_half), "a keeps its partitions");
    assert_eq!(held(&b_after), held(&b_half), "b keeps its partitions");

    // b goes silent: after its session timeout a holds all six.
    let all = heartbeat_until(&client, &a.member_id, held(&a_after), |x| {
        x.partitions.len() == PARTITIONS as usize
    })
    .await;
    assert!(all.generation > a_after.generation);
    assert!(cluster.panics().is_empty(), "{:?}", cluster.panics());
}

/// A member consumes a replicated topic through the kill -9 of a
/// partition leader; every record is handled at least once, and every
/// node's applied state shows the group's lag at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_consumes_through_a_leader_kill_and_every_node_shows_lag_zero() {
    let _one = SERIAL.lock().await;
    let (mut cluster, client) = setup(2).await;
    let producer = client.producer(covet_client::ProducerConfig::default());
    let publish = |from: u32, to: u32| {
        let producer = &producer;
        async move {
            let mut acks = Vec::new();
            for i in from..to {
                let r = covet_client::Record {
                    value: format!("r{i}").into(),
                    ..Default::default()
                };
                acks.push(producer.send(TOPIC, r).await.expect("send"));
            }
            producer.flush().await.expect("flush");
            for a in acks {
                tokio::time::timeout(CONVERGE, a)
                    .await
                    .expect("acked in time")
                    .expect("acked");
            }
        }
    };
    publish(0, 200).await;

    let (mut consumer, member) = member_of_g(&client).await;
    let mut seen = std::collections::BTreeSet::new();
    take_until(&mut consumer, &mut seen, 100).await;
    let leader = cluster
        .leader_of(TOPIC, 0)
        .await
        .expect("views")
        .expect("a leader");
    cluster
        .kill9(leader)
        .await
        .expect("kill a partition leader");
    publish(200, 300).await;
    take_until(&mut consumer, &mut seen, 300).await;
    for i in 0..300 {
        assert!(seen.contains(&format!("r{i}")), "r{i} never handled");
    }
    cluster.restart(leader).await.expect("restart");
    // Every node, the restarted one included, applies the commits.
    for node in cluster.node_ids() {
        let zero = covet_cluster_tests::wait_until(CONVERGE, || async {
            let d = client.describe_group_on(node, "g").await.ok()?;
            (d.partitions.len() == 2 && d.partitions.iter().all(|p| p.lag == 0)).then_some(())
        })
        .await;
        assert!(zero.is_ok(), "node {node} never showed lag 0");
    }
    member.leave().await.expect("leave");
    assert!(cluster.panics().is_empty(), "{:?}", cluster.panics());
}

/// Handles (and acks) records until `seen` holds `n` distinct values.
async fn take_until(
    consumer: &mut covet_client::GroupConsumer,
    seen: &mut std::collections::BTreeSet<String>,
    n: usize,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while seen.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(r))) => {
                seen.insert(String::from_utf8(r.value.to_vec()).expect("utf8"));
                r.ack();
            }
            // A session ended (fenced, or lost with its leader):
            // membership reassigns.
            Ok(Some(Err(_))) => {}
            Ok(None) => panic!("the consumer closed"),
            Err(_) => panic!("only {} of {n} records handled", seen.len()),
        }
    }
}

/// Committed offsets survive kill -9 of every node: a member that joins
/// after the restart starts where the group's commits left off (never
/// before), and the group handles every record at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_kill_9_of_every_node() {
    let _one = SERIAL.lock().await;
    let (mut cluster, client) = setup(2).await;
    let producer = client.producer(covet_client::ProducerConfig::default());
    for i in 0..200 {
        let r = covet_client::Record {
            value: format!("r{i}").into(),
            ..Default::default()
        };
        drop(producer.send(TOPIC, r).await.expect("send"));
    }
    tokio::time::timeout(CONVERGE, producer.flush())
        .await
        .expect("flushed in time")
        .expect("flushed");

    let (mut consumer, _member) = member_of_g(&client).await;
    let mut seen = std::collections::BTreeSet::new();
    take_until(&mut consumer, &mut seen, 120).await;
    // Every record taken was acknowledged; wait until the commits show it
    // (a record in flight past the 120 may be committed too).
    let committed = covet_cluster_tests::wait_until(CONVERGE, || async {
        // The producer's sticky partitioning may put every record in one
        // partition: only partitions with records have progress.
        let d = client.describe_group("g").await.ok()?;
        let total: u64 = d.partitions.iter().map(|p| p.committed).sum();
        (total >= 120).then_some(d)
    })
    .await
    .expect("the acknowledgements are committed");
    let before: Vec<(u32, u64)> = committed
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed))
        .collect();

    let all = cluster.node_ids();
    cluster.kill9_many(&all).await.expect("kill every node");
    drop(consumer);
    cluster
        .restart_many(&all)
        .await
        .expect("restart every node");
    for p in 0..2 {
        cluster
            .wait_leader(TOPIC, p, CONVERGE, |_| true)
            .await
            .expect("partition leader after the restart");
    }
    let client = Client::connect(&cluster.client_addrs())
        .await
        .expect("client after the restart");
    let after = covet_cluster_tests::wait_until(CONVERGE, || async {
        client
            .describe_group("g")
            .await
            .ok()
            .filter(|d| d.partitions.len() == committed.partitions.len())
    })
    .await
    .expect("the group's progress after the restart");
    for (partition, offset) in &before {
        let p = after
            .partitions
            .iter()
            .find(|p| p.partition == *partition)
            .expect("partition");
        assert!(
            p.committed >= *offset,
            "partition {partition}: committed {} after the restart, {offset} before",
            p.committed
        );
    }
    // A new member handles the rest: with what the group handled before,
    // every record at least once.
    let (mut consumer, member) = member_of_g(&client).await;
    take_until(&mut consumer, &mut seen, 200).await;
    member.leave().await.expect("leave");
    assert!(cluster.panics().is_empty(), "{:?}", cluster.panics());
}

/// A member of group "g" on the topic: its consumer and its membership.
async fn member_of_g(client: &Client) -> (covet_client::GroupConsumer, covet_client::Membership) {
    let config = covet_client::GroupConsumerConfig::new("g", "m");
    member(client, config, Duration::from_secs(8)).await
}

/// A member of the group `config` names, on the topic.
async fn member(
    client: &Client,
    config: covet_client::GroupConsumerConfig,
    session_timeout: Duration,
) -> (covet_client::GroupConsumer, covet_client::Membership) {
    let group = config.group.clone();
    let consumer = client.group_consumer(config).expect("consumer");
    let member = covet_client::Membership::join(
        client.clone(),
        &group,
        vec![TOPIC.to_string()],
        session_timeout,
        std::sync::Arc::new(consumer.assigner()),
    )
    .await
    .expect("join");
    (consumer, member)
}

/// Records per partition published in the kill test: before the kill,
/// in a burst to the frozen member (more than it may hold), and in all.
const BEFORE: u32 = 200;
const BURST: u32 = 40;
const RECORDS: u32 = 600;
/// The killed member's session timeout.
const VICTIM_SESSION: Duration = Duration::from_secs(3);
/// Records the killed member may hold unacknowledged per partition.
const VICTIM_IN_FLIGHT: u32 = 20;

/// A `covet subscribe --group g --format json` process; the (partition,
/// offset) of every record it printed (printed, then acked) is collected.
/// Killed when dropped.
struct CliMember {
    child: std::process::Child,
    printed: Arc<Mutex<Vec<(u32, u64)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl CliMember {
    fn start(cluster: &Cluster) -> CliMember {
        let bin = covet_cluster_tests::covet_bin().expect("covet binary");
        let mut child = std::process::Command::new(bin)
            .args(["subscribe", TOPIC, "--group", "g", "--format", "json"])
            .args([
                "--session-timeout-ms",
                &VICTIM_SESSION.as_millis().to_string(),
            ])
            .args(["--max-in-flight", &VICTIM_IN_FLIGHT.to_string()])
            .args(["--broker", &cluster.client_addrs()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn covet subscribe");
        let stdout = child.stdout.take().expect("stdout");
        let printed = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&printed);
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
                let (Some(p), Some(o)) = (v["partition"].as_u64(), v["offset"].as_u64()) else {
                    panic!("no partition and offset in {line}");
                };
                into.lock().unwrap().push((p as u32, o));
            }
        });
        CliMember {
            child,
            printed,
            reader: Some(reader),
        }
    }

    fn printed(&self) -> Vec<(u32, u64)> {
        self.printed.lock().unwrap().clone()
    }

    fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -s {name} failed");
    }

    /// SIGKILL; returns everything it printed (its stdout read to the end).
    fn kill9(mut self) -> Vec<(u32, u64)> {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
        if let Some(r) = self.reader.take() {
            r.join().expect("stdout reader");
        }
        self.printed()
    }
}

impl Drop for CliMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the in-process member handled: each record's acks and the
/// delivery counts it came with.
#[derive(Default)]
struct Handled {
    acked: HashMap<(u32, u64), u32>,
    /// Records handed out with a delivery count above 1.
    redelivered: BTreeSet<(u32, u64)>,
}

/// Handles (acks at once) records until `stop`.
async fn handle_all(
    mut consumer: covet_client::GroupConsumer,
    handled: Arc<Mutex<Handled>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> covet_client::GroupConsumer {
    loop {
        tokio::select! {
            _ = stop.changed() => return consumer,
            r = consumer.next() => match r {
                Some(Ok(r)) => {
                    {
                        let mut h = handled.lock().unwrap();
                        *h.acked.entry((r.partition, r.offset)).or_default() += 1;
                        if r.delivery_count > 1 {
                            h.redelivered.insert((r.partition, r.offset));
                        }
                    }
                    r.ack();
                }
                // A session ended (fenced): membership reassigns.
                Some(Err(_)) => {}
                None => return consumer,
            },
        }
    }
}

/// Publishes records `from..to` of every partition (keyed and unkeyed, in
/// rounds of 20 a partition), returning each one's (partition, offset).
async fn publish_range(client: &Client, from: u32, to: u32) -> BTreeSet<(u32, u64)> {
    let producer = client.producer(covet_client::ProducerConfig::default());
    let mut published = BTreeSet::new();
    for start in (from..to).step_by(20) {
        let mut acks = Vec::new();
        for p in 0..PARTITIONS {
            for n in start..(start + 20).min(to) {
                let r = covet_client::Record {
                    key: (n % 2 == 0).then(|| format!("k{}", n % 7).into()),
                    value: format!("{p}-{n}").into(),
                    ..Default::default()
                };
                acks.push(producer.send_to(TOPIC, p, r).await.expect("send"));
            }
        }
        producer.flush().await.expect("flush");
        for a in acks {
            let m = tokio::time::timeout(CONVERGE, a)
                .await
                .expect("acked in time")
                .expect("acked");
            published.insert((m.partition, m.offset));
        }
    }
    published
}

/// A member killed with -9 mid-stream while it holds unacknowledged
/// records: the other member takes its partitions within its session
/// timeout and a rebalance, gets those records again, and between them
/// the two handle every record; every node's applied state ends at lag 0.
///
/// The killed member is a real `covet subscribe --group` process: an
/// in-process consumer cannot be killed (dropping it cancels its streams
/// through the client library while its connections and its heartbeat
/// task live on, which is not what a crash looks like to the broker and
/// the coordinator). It is frozen (SIGSTOP) before a burst is published,
/// so the broker sends it records it can never acknowledge, and killed
/// once the group's commits show them out: "while it holds unacked
/// records" is then certain, not a matter of timing. The broker sees what
/// a kill -9 of a running process looks like: its connections reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_mid_stream_hands_its_unacked_records_to_the_survivor() {
    let _one = SERIAL.lock().await;
    let (cluster, client) = setup(PARTITIONS).await;
    let started = tokio::time::Instant::now();
    let all: BTreeSet<u32> = (0..PARTITIONS).collect();
    let config = covet_client::GroupConsumerConfig {
        max_in_flight: 50,
        ..covet_client::GroupConsumerConfig::new("g", "survivor")
    };
    let (consumer, membership) = member(&client, config, Duration::from_secs(3)).await;
    let assigner = consumer.assigner();
    let handled = Arc::new(Mutex::new(Handled::default()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let handler = tokio::spawn(handle_all(consumer, handled.clone(), stopped));
    let victim = CliMember::start(&cluster);

    // Phase 1: both members consume, 3 partitions each.
    covet_cluster_tests::wait_until(CONVERGE, || async {
        (assigner.owned().len() == 3).then_some(())
    })
    .await
    .expect("the survivor gives the victim half the partitions");
    let mut published = publish_range(&client, 0, BEFORE).await;
    let seen = Mutex::new(String::new());
    let mine = covet_cluster_tests::wait_until(CONVERGE, || async {
        let mine: BTreeSet<u32> = assigner.owned().iter().map(|(_, p)| *p).collect();
        let theirs: BTreeSet<u32> = victim.printed().iter().map(|(p, _)| *p).collect();
        let acked: BTreeSet<u32> = handled
            .lock()
            .unwrap()
            .acked
            .keys()
            .map(|(p, _)| *p)
            .collect();
        *seen.lock().unwrap() =
            format!("the survivor owns {mine:?}, acked {acked:?}; the victim printed {theirs:?}");
        (mine.len() == 3
            && all.difference(&mine).all(|p| theirs.contains(p))
            && mine.is_subset(&acked))
        .then_some(mine)
    })
    .await
    .unwrap_or_else(|_| panic!("no 3/3 split with both handling: {}", seen.lock().unwrap()));
    let theirs: BTreeSet<u32> = all.difference(&mine).copied().collect();
    println!(
        "3/3 split at {:?}: the survivor has {mine:?}, the victim {theirs:?}",
        started.elapsed()
    );

    // Phase 2: the victim freezes; a burst reaches its sessions, which the
    // broker counts as out with it.
    victim.signal("STOP");
    let frozen = tokio::time::Instant::now();
    published.extend(publish_range(&client, BEFORE, BEFORE + BURST).await);
    covet_cluster_tests::wait_until(CONVERGE, || async {
        let d = client.describe_group("g").await.ok()?;
        theirs
            .iter()
            .all(|p| {
                d.partitions
                    .iter()
                    .any(|gp| gp.partition == *p && gp.delivered_unacked > 0)
            })
            .then_some(())
    })
    .await
    .expect("the victim's partitions show records out with it");
    let printed: BTreeSet<(u32, u64)> = victim.kill9().into_iter().collect();
    // Killed before the coordinator could notice the freeze: a kill of a
    // member in the middle of its session.
    assert!(
        frozen.elapsed() < VICTIM_SESSION,
        "killed {:?} after the freeze",
        frozen.elapsed()
    );
    println!(
        "killed {:?} after the freeze, at {:?}",
        frozen.elapsed(),
        started.elapsed()
    );

    // Phase 3: published while the survivor takes over.
    let rest = {
        let client = client.clone();
        tokio::spawn(async move { publish_range(&client, BEFORE + BURST, RECORDS).await })
    };
    covet_cluster_tests::wait_until(CONVERGE, || async {
        (assigner.owned().len() == PARTITIONS as usize).then_some(())
    })
    .await
    .expect("the survivor takes every partition");
    let takeover = frozen.elapsed();
    published.extend(rest.await.expect("publisher"));
    assert_eq!(published.len(), (RECORDS * PARTITIONS) as usize);
    covet_cluster_tests::wait_until(CONVERGE, || async {
        let h = handled.lock().unwrap();
        published
            .iter()
            .all(|r| h.acked.contains_key(r) || printed.contains(r))
            .then_some(())
    })
    .await
    .expect("every record handled by one member or the other");

    // Every node's applied state: every partition committed to its end.
    for node in cluster.node_ids() {
        let zero = covet_cluster_tests::wait_until(CONVERGE, || async {
            let d = client.describe_group_on(node, "g").await.ok()?;
            (d.partitions.len() == PARTITIONS as usize
                && d.partitions
                    .iter()
                    .all(|p| p.lag == 0 && p.committed == u64::from(RECORDS)))
            .then_some(())
        })
        .await;
        assert!(
            zero.is_ok(),
            "node {node} never showed lag 0 on every partition"
        );
    }
    membership.leave().await.expect("leave");
    let _ = stop.send(true);
    handler
        .await
        .expect("handler")
        .close()
        .await
        .expect("close");

    let h = handled.lock().unwrap();
    let twice = printed.iter().filter(|r| h.acked.contains_key(r)).count();
    let theirs_again = h
        .redelivered
        .iter()
        .filter(|(p, _)| theirs.contains(p))
        .count();
    println!(
        "the victim printed {}; the survivor handled {}, {} of them delivered again ({theirs_again} \
         of the victim's partitions), {twice} printed by the victim too; takeover {takeover:?} \
         after the freeze; {:?} in all",
        printed.len(),
        h.acked.len(),
        h.redelivered.len(),
        started.elapsed()
    );
    // What the victim held unacknowledged went to the survivor.
    assert!(theirs_again > 0, "no record of the victim's came again");
    // Within its session timeout and one rebalance (a heartbeat of the
    // survivor, 600 ms, and opening its sessions), with room for a slow
    // machine.
    assert!(
        takeover < VICTIM_SESSION + Duration::from_secs(3),
        "takeover took {takeover:?}"
    );
    assert!(cluster.panics().is_empty(), "{:?}", cluster.panics());
}
