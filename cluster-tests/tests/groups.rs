//! Consumer groups on a real 3-node cluster: the coordinator (the metadata
//! leader) is killed with -9 and the group goes on under the new one, the
//! members keeping their ids and partitions; a member that then goes
//! silent times out and the other takes its partitions.

use std::time::Duration;

use covet_client::{Client, TopicSpec};
use covet_cluster_tests::Cluster;
use covet_protocol::api::MemberAssignment;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_survives_the_loss_of_its_coordinator() {
    let mut cluster = Cluster::start(3).await.expect("cluster");
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
    for p in 0..PARTITIONS {
        cluster
            .wait_leader(TOPIC, p, CONVERGE, |_| true)
            .await
            .expect("partition leader");
    }
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
