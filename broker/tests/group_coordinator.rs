//! The consumer-group coordinator against a real broker: members join,
//! heartbeat and leave; partitions are shared out, sticky and revoked
//! before they move; a silent member times out and its partitions go to
//! the others; the membership record survives a restart.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Broker;
use covet_client::{Client, Reason, TopicSpec};
use covet_protocol::api::MemberAssignment;

type Owned = Vec<(String, u32)>;

fn held(a: &MemberAssignment) -> Owned {
    a.partitions
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect()
}

/// Heartbeats as member `id` reporting `owned`, until `done` holds for the
/// answer (each answer becomes what it reports next, as a member that
/// opens and closes sessions at once would), within 20 s.
async fn heartbeat_until(
    client: &Client,
    group: &str,
    id: &str,
    mut owned: Owned,
    done: impl Fn(&MemberAssignment) -> bool,
) -> MemberAssignment {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = client.heartbeat(group, id, &owned).await.unwrap();
        if done(&a) {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "member {id} never got there; last answer {a:?}"
        );
        owned = held(&a);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn six_partitions(addr: &str) -> Client {
    let client = Client::connect(addr).await.unwrap();
    client
        .create_topic(TopicSpec {
            partitions: 6,
            ..TopicSpec::new("t")
        })
        .await
        .unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_a_moving_one_is_released_first() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = six_partitions(&broker.addr).await;
    let topics = vec!["t".to_string()];

    let a = client.join_group("g", &topics, 10_000).await.unwrap();
    assert_eq!(a.partitions.len(), 6, "a lone member gets everything");
    let a_id = a.member_id.clone();
    let a_all = held(&a);
    let b = client.join_group("g", &topics, 10_000).await.unwrap();
    assert!(b.generation > a.generation);
    assert!(
        b.partitions.is_empty(),
        "nothing for b while a still holds all: {b:?}"
    );
    // a learns it keeps three (sticky: nothing new for it).
    let a_now = client.heartbeat("g", &a_id, &a_all).await.unwrap();
    assert_eq!(a_now.partitions.len(), 3);
    let kept: BTreeSet<_> = held(&a_now).into_iter().collect();
    assert!(kept.iter().all(|p| a_all.contains(p)));
    // b gets the other three only once a stops reporting them.
    let still = client.heartbeat("g", &b.member_id, &[]).await.unwrap();
    assert!(still.partitions.is_empty(), "{still:?}");
    client.heartbeat("g", &a_id, &held(&a_now)).await.unwrap();
    let b_now = heartbeat_until(&client, "g", &b.member_id, vec![], |x| {
        x.partitions.len() == 3
    })
    .await;
    let given: BTreeSet<_> = held(&b_now).into_iter().collect();
    assert!(given.is_disjoint(&kept));
    assert_eq!(given.len() + kept.len(), 6);

    // Leaving hands b's partitions to a at once.
    client.leave_group("g", &b.member_id).await.unwrap();
    heartbeat_until(&client, "g", &a_id, held(&a_now), |x| {
        x.partitions.len() == 6
    })
    .await;
    let gone = client.heartbeat("g", &b.member_id, &[]).await.unwrap_err();
    assert_eq!(gone.reason(), Some(Reason::UnknownMember));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_times_out_and_the_record_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    let client = six_partitions(&broker.addr).await;
    let topics = vec!["t".to_string()];

    let a = client.join_group("g", &topics, 1_000).await.unwrap();
    let a_id = a.member_id.clone();
    let b = client.join_group("g", &topics, 1_000).await.unwrap();
    let a_half = heartbeat_until(&client, "g", &a_id, held(&a), |x| x.partitions.len() == 3).await;
    // a releases the other three (reports only what it keeps).
    client.heartbeat("g", &a_id, &held(&a_half)).await.unwrap();
    heartbeat_until(&client, "g", &b.member_id, vec![], |x| {
        x.partitions.len() == 3
    })
    .await;
    // b goes silent: within its 1 s session timeout (and a check) a holds
    // everything again.
    let started = std::time::Instant::now();
    let all = heartbeat_until(&client, "g", &a_id, held(&a_half), |x| {
        x.partitions.len() == 6
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "b expired too early"
    );

    // The coordinator's record outlives the process: a keeps its member
    // id and its partitions.
    broker.terminate();
    broker.restart();
    let client = Client::connect(&broker.addr).await.unwrap();
    let after = common::wait_for(Duration::from_secs(30), || async {
        client.heartbeat("g", &a_id, &held(&all)).await.ok()
    })
    .await
    .expect("the member is known after the restart");
    assert_eq!(held(&after), held(&all));
    assert!(after.generation >= all.generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_joins_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = six_partitions(&broker.addr).await;
    for (group, topics, timeout, why) in [
        ("g", vec![], 10_000, "no topics"),
        ("a/b", vec!["t".to_string()], 10_000, "bad name"),
        ("g", vec!["t".to_string()], 10, "session timeout too short"),
    ] {
        let err = client
            .join_group(group, &topics, timeout)
            .await
            .expect_err(why);
        assert_eq!(err.reason(), Some(Reason::InvalidRequest), "{why}");
    }
}

/// A partition granted to a member stays its until a heartbeat sent after
/// that grant says it let go, even if a later plan moves it away before
/// that heartbeat: the member may already be consuming it. (Seen in the
/// group benchmark: four members joining at once, and a member's session
/// fenced by another member granted the partition it was consuming.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_partition_is_not_given_away_before_its_member_reports() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = six_partitions(&broker.addr).await;
    let topics = vec!["t".to_string()];

    let a = client.join_group("g", &topics, 10_000).await.unwrap();
    let a_all: BTreeSet<_> = held(&a).into_iter().collect();
    assert_eq!(a_all.len(), 6);
    // `a` opens all six; before its first heartbeat, two others join and
    // one of them heartbeats (reporting nothing yet).
    let b = client.join_group("g", &topics, 10_000).await.unwrap();
    let c = client.join_group("g", &topics, 10_000).await.unwrap();
    for (id, first) in [(&b.member_id, &b), (&c.member_id, &c)] {
        assert!(first.partitions.is_empty(), "{id} got {first:?}");
        let again = client.heartbeat("g", id, &[]).await.unwrap();
        assert!(
            again.partitions.is_empty(),
            "{id} was granted {:?} while a has not yet reported letting go of any",
            held(&again)
        );
    }
    // Once `a` reports what it kept, the others get the rest.
    let a_now = client
        .heartbeat(
            "g",
            &a.member_id,
            &a_all.iter().cloned().collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let kept = held(&a_now);
    assert_eq!(kept.len(), 2, "a keeps its share: {a_now:?}");
    client.heartbeat("g", &a.member_id, &kept).await.unwrap();
    let b_now = heartbeat_until(&client, "g", &b.member_id, vec![], |x| {
        x.partitions.len() == 2
    })
    .await;
    let c_now = heartbeat_until(&client, "g", &c.member_id, vec![], |x| {
        x.partitions.len() == 2
    })
    .await;
    let mut all: Vec<_> = kept;
    all.extend(held(&b_now));
    all.extend(held(&c_now));
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        6,
        "every partition in exactly one member's hands"
    );
}

/// `DescribeGroup` shows the members and what each may consume, and
/// `ListGroups` shows a group that has members but no progress yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_the_members_and_list_a_group_without_progress() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = six_partitions(&broker.addr).await;
    let topics = vec!["t".to_string()];

    let a = client.join_group("g", &topics, 10_000).await.unwrap();
    let b = client.join_group("g", &topics, 10_000).await.unwrap();
    let a_kept = heartbeat_until(&client, "g", &a.member_id, held(&a), |x| {
        x.partitions.len() == 3
    })
    .await;
    client
        .heartbeat("g", &a.member_id, &held(&a_kept))
        .await
        .unwrap();
    let b_now = heartbeat_until(&client, "g", &b.member_id, vec![], |x| {
        x.partitions.len() == 3
    })
    .await;

    assert_eq!(client.list_groups().await.unwrap(), vec!["g".to_string()]);
    let d = client.describe_group("g").await.unwrap();
    assert!(d.generation >= b_now.generation, "{d:?}");
    let mut members: Vec<(String, Owned)> = d
        .members
        .iter()
        .map(|m| {
            let parts = m
                .partitions
                .iter()
                .map(|p| (p.topic.clone(), p.partition))
                .collect();
            (m.id.clone(), parts)
        })
        .collect();
    members.sort();
    let mut expected = vec![
        (a.member_id.clone(), held(&a_kept)),
        (b.member_id.clone(), held(&b_now)),
    ];
    expected.sort();
    assert_eq!(members, expected);
    assert!(d.members.iter().all(|m| m.topics == topics));

    client.leave_group("g", &a.member_id).await.unwrap();
    client.leave_group("g", &b.member_id).await.unwrap();
    assert!(
        client.list_groups().await.unwrap().is_empty(),
        "no members and no progress: not listed"
    );
}
