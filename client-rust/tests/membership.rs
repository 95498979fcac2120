//! Consumer-group membership against a real broker, with an assignment
//! target that records what it is given and holds it at once: two members
//! split a topic without ever holding one partition together, a member
//! that leaves hands its partitions over, and one the coordinator forgot
//! joins again.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Broker;
use covet_client::{AssignmentTarget, Client, Membership, Result, TopicSpec};

type Partitions = BTreeSet<(String, u32)>;

/// Holds exactly what it was last assigned; every member's holding goes
/// into a shared log checked for overlaps.
struct Recorder {
    me: usize,
    held: Mutex<Partitions>,
    all: Arc<Mutex<Vec<Partitions>>>,
}

impl AssignmentTarget for Recorder {
    fn assign(
        &self,
        _generation: u64,
        partitions: Vec<(String, u32)>,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            let new: Partitions = partitions.into_iter().collect();
            let mut all = self.all.lock().unwrap();
            for (i, other) in all.iter().enumerate() {
                if i != self.me {
                    let both: Vec<_> = other.intersection(&new).collect();
                    assert!(
                        both.is_empty(),
                        "member {} given {both:?} held by {i}",
                        self.me
                    );
                }
            }
            all[self.me] = new.clone();
            *self.held.lock().unwrap() = new;
            Ok(())
        })
    }

    fn owned(&self) -> Vec<(String, u32)> {
        self.held.lock().unwrap().iter().cloned().collect()
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_split_a_topic_hand_over_on_leave_and_never_overlap() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("t").partitions(6))
        .await
        .unwrap();
    let all = Arc::new(Mutex::new(vec![Partitions::new(); 2]));
    let recorder = |me| {
        Arc::new(Recorder {
            me,
            held: Mutex::default(),
            all: Arc::clone(&all),
        })
    };
    let (ra, rb) = (recorder(0), recorder(1));
    let topics = vec!["t".to_string()];
    let a = Membership::join(
        client.clone(),
        "g",
        topics.clone(),
        Duration::from_secs(10),
        ra.clone(),
    )
    .await
    .unwrap();
    assert_eq!(ra.owned().len(), 6);
    let b = Membership::join(
        client.clone(),
        "g",
        topics,
        Duration::from_secs(10),
        rb.clone(),
    )
    .await
    .unwrap();
    wait_for("a 3/3 split", || {
        ra.owned().len() == 3 && rb.owned().len() == 3
    })
    .await;
    assert_ne!(a.member_id().await, b.member_id().await);

    b.leave().await.unwrap();
    assert!(rb.owned().is_empty(), "leaving closes every session");
    wait_for("a holds all six again", || ra.owned().len() == 6).await;
    a.leave().await.unwrap();
    assert!(client.describe_group("g").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_the_coordinator_forgot_joins_again() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new("t").partitions(2))
        .await
        .unwrap();
    let all = Arc::new(Mutex::new(vec![Partitions::new()]));
    let r = Arc::new(Recorder {
        me: 0,
        held: Mutex::default(),
        all,
    });
    let m = Membership::join(
        client.clone(),
        "g",
        vec!["t".to_string()],
        Duration::from_secs(10),
        r.clone(),
    )
    .await
    .unwrap();
    let first = m.member_id().await;
    // Removed behind its back (as a timeout would): its next heartbeat
    // hears UNKNOWN_MEMBER, and it joins under a new id.
    client.leave_group("g", &first).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while m.member_id().await == first {
        assert!(tokio::time::Instant::now() < deadline, "never rejoined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for("the new member holds both partitions", || {
        r.owned().len() == 2
    })
    .await;
    m.leave().await.unwrap();
}
