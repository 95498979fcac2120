//! Consumer groups on a real 3-node cluster: the coordinator (the metadata
//! leader) is killed with -9 and the group goes on under the new one, the
//! members keeping their ids and partitions; a member that then goes
//! silent times out and the other takes its partitions.

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
    let consumer = client
        .group_consumer(covet_client::GroupConsumerConfig::new("g", "m"))
        .expect("consumer");
    let member = covet_client::Membership::join(
        client.clone(),
        "g",
        vec![TOPIC.to_string()],
        Duration::from_secs(8),
        std::sync::Arc::new(consumer.assigner()),
    )
    .await
    .expect("join");
    (consumer, member)
}
