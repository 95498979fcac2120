//! Membership changes that used to wedge a partition or let a wiped node
//! back in with an empty log, on real 3-node clusters.

use std::time::{Duration, Instant};

use bytes::Bytes;
use covet_client::{Client, ProducerConfig, Reason, Record, TopicSpec};
use covet_cluster_tests::{every_group, wait_until, Cluster, NodeId};
use tokio::sync::Mutex;

/// One cluster at a time: two on two cores slow each other past their
/// election timeouts.
static SERIAL: Mutex<()> = Mutex::const_new(());

const TOPIC: &str = "members";
const PARTITIONS: u32 = 3;
/// Bound on a change reaching every group. A handover takes about one
/// round trip and a conf change one commit; the old failure mode was a
/// wedge (forever) or a 20–30 s gap.
const CONVERGE: Duration = Duration::from_secs(15);

async fn setup() -> (Cluster, Client) {
    let cluster = Cluster::start(3).await.expect("cluster");
    let client = Client::connect(&cluster.client_addrs())
        .await
        .expect("client");
    client
        .create_topic(TopicSpec {
            replication_factor: 3,
            ..TopicSpec::new(TOPIC).partitions(PARTITIONS)
        })
        .await
        .expect("create topic");
    // Every node must know the topic before the producer asks any of them.
    for p in 0..PARTITIONS {
        cluster
            .wait_leader(TOPIC, p, CONVERGE, |_| true)
            .await
            .expect("partition leader");
    }
    (cluster, client)
}

/// Publishes one record to each partition, each acknowledged in time.
async fn publish_everywhere(client: &Client, tag: &str) {
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        ..Default::default()
    });
    for p in 0..PARTITIONS {
        let record = Record {
            key: None,
            value: Bytes::from(format!("{tag}-{p}")),
            headers: vec![],
            timestamp_ms: covet_protocol::now_ms(),
        };
        let delivery = producer.send_to(TOPIC, p, record).await.expect("send");
        let acked = tokio::time::timeout(Duration::from_secs(20), async {
            producer.flush().await?;
            delivery.await
        })
        .await
        .unwrap_or_else(|_| panic!("{tag}: partition {p} not acknowledged in 20 s"));
        acked.unwrap_or_else(|e| panic!("{tag}: partition {p}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_partition_leader_hands_over_and_every_group_converges() {
    let _serial = SERIAL.lock().await;
    let (cluster, client) = setup().await;
    publish_everywhere(&client, "before").await;
    let victim: NodeId = cluster
        .wait_leader(TOPIC, 2, CONVERGE, |_| true)
        .await
        .expect("leader of partition 2");
    client
        .change_membership(false, victim)
        .await
        .expect("remove-node");
    let started = Instant::now();
    let converged = wait_until(CONVERGE, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| {
            g.leader != victim && g.replicas.iter().all(|r| r.node != victim)
        })
    })
    .await;
    if let Err(e) = converged {
        cluster.dump_logs(40);
        panic!("node {victim} still leads or replicates a group: {e:#}");
    }
    println!(
        "removal of node {victim} reached every group in {:?}",
        started.elapsed()
    );
    publish_everywhere(&client, "after-remove").await;

    client
        .change_membership(true, victim)
        .await
        .expect("add-node");
    let started = Instant::now();
    let back = wait_until(CONVERGE, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| {
            g.replicas.iter().any(|r| r.node == victim && r.matched > 0)
        })
    })
    .await;
    if let Err(e) = back {
        cluster.dump_logs(40);
        panic!("node {victim} did not rejoin every group: {e:#}");
    }
    println!(
        "node {victim} rejoined every group in {:?}",
        started.elapsed()
    );
    publish_everywhere(&client, "after-add").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_still_listed_as_a_replica_cannot_be_added() {
    let _serial = SERIAL.lock().await;
    let (mut cluster, client) = setup().await;
    publish_everywhere(&client, "before").await;
    let meta = cluster.metadata_leader().await.expect("metadata leader");
    let victim = cluster
        .node_ids()
        .into_iter()
        .find(|&n| Some(n) != meta)
        .expect("a follower");
    cluster.kill9(victim).await.expect("kill");
    cluster.wipe(victim).expect("wipe");
    // Never removed: adding it back would make an empty log a voter.
    let refused = client.change_membership(true, victim).await;
    match refused {
        Err(e) if e.reason() == Some(Reason::MembershipConflict) => {}
        other => panic!("add-node of a member must be refused, got {other:?}"),
    }
    client
        .change_membership(false, victim)
        .await
        .expect("remove-node");
    wait_until(CONVERGE, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| g.replicas.iter().all(|r| r.node != victim))
    })
    .await
    .expect("removal reached every group");
    client
        .change_membership(true, victim)
        .await
        .expect("add-node once gone");
    cluster.restart(victim).await.expect("restart");
    wait_until(CONVERGE, || async {
        let views = client.cluster_status().await.ok()?;
        every_group(&views, |g| {
            g.replicas.iter().any(|r| r.node == victim && r.matched > 0)
        })
    })
    .await
    .expect("the wiped node caught up as a new member");
    publish_everywhere(&client, "after").await;
}
