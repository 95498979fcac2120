//! Group members sharing a topic while it is written, against a real
//! `covet broker` process: two members split a 6-partition topic, a third
//! joins mid-stream (a rebalance under load), one leaves gracefully, and
//! throughout no record and no partition is ever in the hands of two
//! members at once, and every record is handled exactly once.
//!
//! Exactly once is what ADR 0009 promises while no member dies: a
//! partition moves only after its old owner reports it released, a release
//! waits for the records its application holds (their acks are sent
//! before the session ends, and the leader's cursor outlives the session),
//! and records the old owner received but never handed out are dropped,
//! not handled. Such records reach the next owner with a delivery count
//! above 1; that count is printed, not asserted, since it depends on
//! timing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Broker;
use covet_client::{
    Assigner, Client, GroupConsumer, GroupConsumerConfig, GroupRecord, Membership, ProducerConfig,
    Record, TopicSpec,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const TOPIC: &str = "t";
const GROUP: &str = "g";
const PARTITIONS: u32 = 6;
/// Records per partition, published in [`ROUNDS`] rounds.
const PER_PARTITION: u32 = 2_000;
const ROUNDS: u32 = 250;
/// Between two rounds: 12,000 records take about 7.5 s to publish, so the
/// rebalances happen while records arrive.
const PACE: Duration = Duration::from_millis(30);
/// Long enough that no member times out on a loaded 2-core machine (a
/// timeout would be a death, which this test is not about); heartbeats
/// go every fifth of it.
const SESSION: Duration = Duration::from_secs(5);
/// A member acks what it holds once it holds this many records...
const HOLD_MAX: usize = 32;
/// ...or the first of them came this long ago: with a round published
/// every [`PACE`], members nearly always hold records, so every
/// rebalance finds some in hand.
const HOLD_FOR: Duration = Duration::from_millis(20);
/// Bounds every wait.
const STEP: Duration = Duration::from_secs(20);

type Offset = (u32, u64);

/// What every member's handling is checked against; one lock, so each
/// check sees every member at one instant.
#[derive(Default)]
struct Ledger {
    /// Records in some member's hands (received, not yet acked) → that
    /// member.
    holder: HashMap<Offset, usize>,
    /// Partition → member → records of it that member holds.
    in_hand: HashMap<u32, BTreeMap<usize, usize>>,
    /// Times each record was acked.
    acked: HashMap<Offset, u32>,
    /// Records handed out with a delivery count above 1.
    redelivered: u64,
    /// Records each member handled.
    handled: BTreeMap<usize, u64>,
    violations: Vec<String>,
}

impl Ledger {
    fn receive(&mut self, me: usize, r: &GroupRecord) {
        let at = (r.partition, r.offset);
        if r.delivery_count > 1 {
            self.redelivered += 1;
        }
        if let Some(other) = self.holder.insert(at, me) {
            self.violations.push(format!(
                "{at:?} handed to member {me} while member {other} holds it"
            ));
        }
        let holders = self.in_hand.entry(r.partition).or_default();
        *holders.entry(me).or_default() += 1;
        if holders.len() > 1 {
            self.violations.push(format!(
                "partition {} in the hands of members {:?} at once",
                r.partition,
                holders.keys().collect::<Vec<_>>()
            ));
        }
    }

    /// Called just before the ack.
    fn ack(&mut self, me: usize, r: &GroupRecord) {
        let at = (r.partition, r.offset);
        if self.holder.remove(&at) != Some(me) {
            self.violations
                .push(format!("member {me} acks {at:?}, which it does not hold"));
        }
        if let Some(holders) = self.in_hand.get_mut(&r.partition) {
            if let Some(n) = holders.get_mut(&me) {
                *n -= 1;
                if *n == 0 {
                    holders.remove(&me);
                }
            }
        }
        *self.acked.entry(at).or_default() += 1;
        *self.handled.entry(me).or_default() += 1;
    }
}

/// One member: its consumer handled on its own task, its membership
/// heartbeating on another.
struct Member {
    assigner: Assigner,
    membership: Membership,
    stop: watch::Sender<bool>,
    task: JoinHandle<GroupConsumer>,
}

impl Member {
    async fn join(client: &Client, me: usize, ledger: Arc<Mutex<Ledger>>) -> Member {
        let consumer = client
            .group_consumer(GroupConsumerConfig {
                max_in_flight: 50,
                ..GroupConsumerConfig::new(GROUP, format!("m{me}"))
            })
            .expect("consumer");
        let assigner = consumer.assigner();
        let membership = Membership::join(
            client.clone(),
            GROUP,
            vec![TOPIC.to_string()],
            SESSION,
            Arc::new(consumer.assigner()),
        )
        .await
        .expect("join");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(handle(me, consumer, ledger, stopped));
        Member {
            assigner,
            membership,
            stop,
            task,
        }
    }

    fn owned(&self) -> usize {
        self.assigner.owned().len()
    }

    /// Leaves gracefully (every partition released, what is held acked
    /// first), then stops handling.
    async fn leave(self) {
        tokio::time::timeout(STEP, self.membership.leave())
            .await
            .expect("left in time")
            .expect("leave");
        let _ = self.stop.send(true);
        let consumer = tokio::time::timeout(STEP, self.task)
            .await
            .expect("handling stopped in time")
            .expect("handling task");
        consumer.close().await.expect("close");
    }
}

/// Handles records as an application would: takes them, holds a few for
/// a moment, then acks them, recording each step in `ledger`.
async fn handle(
    me: usize,
    mut consumer: GroupConsumer,
    ledger: Arc<Mutex<Ledger>>,
    mut stopped: watch::Receiver<bool>,
) -> GroupConsumer {
    let mut held: Vec<GroupRecord> = Vec::new();
    // When what is held is acked: HOLD_FOR after the first of it came.
    let mut due = Instant::now();
    loop {
        let wait = if held.is_empty() {
            STEP
        } else {
            due.saturating_duration_since(Instant::now())
        };
        let got = tokio::select! {
            _ = stopped.changed() => break,
            got = tokio::time::timeout(wait, consumer.next()) => got,
        };
        match got {
            Ok(Some(Ok(r))) => {
                ledger.lock().unwrap().receive(me, &r);
                if held.is_empty() {
                    due = Instant::now() + HOLD_FOR;
                }
                held.push(r);
                if held.len() < HOLD_MAX && Instant::now() < due {
                    continue;
                }
            }
            // No member dies here, so no session may end on its own.
            Ok(Some(Err(e))) => ledger
                .lock()
                .unwrap()
                .violations
                .push(format!("member {me}: a session ended: {e}")),
            Ok(None) => break,
            Err(_) => {}
        }
        for r in held.drain(..) {
            ledger.lock().unwrap().ack(me, &r);
            r.ack();
        }
    }
    // A released partition takes no acks: nothing may be held by now.
    if !held.is_empty() {
        ledger.lock().unwrap().violations.push(format!(
            "member {me} stopped holding {} records",
            held.len()
        ));
    }
    consumer
}

/// Watches the members' partitions until `stop`: reads every member's
/// [`Assigner::owned`] twice in a row, in a fixed order, and fails on a
/// partition that member `i` held at both its reads while member `j` held
/// it at a read in between. `owned` covers a partition from the moment
/// its session starts opening to the end of its release, and a partition
/// cannot leave a member and come back within microseconds (that takes
/// two heartbeats), so `i` held it throughout.
async fn watch_overlaps(
    members: Arc<Mutex<Vec<Assigner>>>,
    ledger: Arc<Mutex<Ledger>>,
    samples: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let all = members.lock().unwrap().clone();
        let first: Vec<BTreeSet<(String, u32)>> = all
            .iter()
            .map(|a| a.owned().into_iter().collect())
            .collect();
        let second: Vec<BTreeSet<(String, u32)>> = all
            .iter()
            .map(|a| a.owned().into_iter().collect())
            .collect();
        samples.fetch_add(1, Ordering::Relaxed);
        for i in 0..all.len() {
            for j in (0..all.len()).filter(|&j| j != i) {
                // Reads in order: first[0..n], then second[0..n]; the
                // read of j between first[i] and second[i]:
                let between = if j > i { &first[j] } else { &second[j] };
                let both: Vec<_> = first[i]
                    .intersection(&second[i])
                    .filter(|p| between.contains(*p))
                    .collect();
                if !both.is_empty() {
                    ledger
                        .lock()
                        .unwrap()
                        .violations
                        .push(format!("members {i} and {j} both own {both:?}"));
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
    }
}

/// Publishes [`ROUNDS`] rounds of one [`PACE`] each, every partition
/// getting `PER_PARTITION / ROUNDS` records a round (even ones keyed by
/// one of seven keys, odd ones without a key). Round `r` waits until
/// `allowed` reaches `r`: the test holds the second and third part back
/// until the rebalance they are to overlap has begun. Keeps `count` at
/// the number acknowledged so far; returns every record's (partition,
/// offset).
async fn publish(
    client: Client,
    mut allowed: watch::Receiver<u32>,
    count: Arc<AtomicUsize>,
) -> BTreeSet<Offset> {
    let producer = client.producer(ProducerConfig::default());
    let per_round = PER_PARTITION / ROUNDS;
    let mut published = BTreeSet::new();
    let mut tick = tokio::time::interval(PACE);
    for round in 0..ROUNDS {
        allowed
            .wait_for(|&a| a > round)
            .await
            .expect("the test outlives the publisher");
        tick.tick().await;
        let mut deliveries = Vec::new();
        for p in 0..PARTITIONS {
            for i in 0..per_round {
                let n = round * per_round + i;
                let r = Record {
                    key: (n % 2 == 0).then(|| Bytes::from(format!("k{}", n % 7))),
                    value: Bytes::from(format!("{p}-{n}")),
                    ..Default::default()
                };
                deliveries.push(producer.send_to(TOPIC, p, r).await.expect("send"));
            }
        }
        producer.flush().await.expect("flush");
        for d in deliveries {
            let m = tokio::time::timeout(STEP, d)
                .await
                .expect("acked in time")
                .expect("acked");
            assert!(published.insert((m.partition, m.offset)), "{m:?} twice");
        }
        count.store(published.len(), Ordering::Relaxed);
    }
    published
}

/// Waits for `cond`; on a timeout the first violations seen say why.
async fn wait_for(what: &str, ledger: &Mutex<Ledger>, mut cond: impl FnMut() -> bool) {
    if !common::wait_until(STEP, &mut cond).await {
        let l = ledger.lock().unwrap();
        panic!(
            "timed out: {what}; handled per member {:?}; first violations {:?}",
            l.handled,
            &l.violations[..l.violations.len().min(5)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_three_members_share_a_topic_under_load_each_record_in_one_hand_once() {
    let broker = Broker::start();
    let started = Instant::now();
    let client = Client::connect(&broker.addr).await.unwrap();
    client
        .create_topic(TopicSpec::new(TOPIC).partitions(PARTITIONS))
        .await
        .unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let assigners = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(AtomicUsize::new(0));
    let (stop_watch, stopped) = watch::channel(false);
    let watcher = tokio::spawn(watch_overlaps(
        assigners.clone(),
        ledger.clone(),
        samples.clone(),
        stopped,
    ));
    let join = |me| {
        let (client, ledger, assigners) = (&client, ledger.clone(), assigners.clone());
        async move {
            let m = Member::join(client, me, ledger).await;
            assigners.lock().unwrap().push(m.assigner.clone());
            m
        }
    };
    let handled_by = |ledger: &Arc<Mutex<Ledger>>, me: usize| {
        ledger
            .lock()
            .unwrap()
            .handled
            .get(&me)
            .copied()
            .unwrap_or(0)
    };

    // Two members; the first third published while they split the topic.
    let (allow, allowed) = watch::channel(ROUNDS / 3);
    let a = join(0).await;
    let count = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish(client.clone(), allowed, count.clone()));
    let progress = |what: &str| {
        println!(
            "{what} at {:?}, {} records published",
            started.elapsed(),
            count.load(Ordering::Relaxed)
        );
    };
    let b = join(1).await;
    wait_for("a 3/3 split, both members handling", &ledger, || {
        a.owned() == 3 && b.owned() == 3 && handled_by(&ledger, 1) > 0
    })
    .await;
    progress("3/3 split");

    // A third member joins mid-stream: partitions move from the two
    // others while the second third is published.
    allow.send_replace(2 * ROUNDS / 3);
    progress("c joins");
    let c = join(2).await;
    wait_for("a 2/2/2 split", &ledger, || {
        a.owned() == 2 && b.owned() == 2 && c.owned() == 2
    })
    .await;
    progress("2/2/2 split");

    // The first member leaves gracefully while the last third is
    // published.
    allow.send_replace(ROUNDS);
    progress("a leaves");
    a.leave().await;
    wait_for("a 3/3 split between the two left", &ledger, || {
        b.owned() == 3 && c.owned() == 3
    })
    .await;
    progress("a left; 3/3 split");

    let published = tokio::time::timeout(STEP, publisher)
        .await
        .expect("published in time")
        .expect("publisher");
    assert_eq!(published.len(), (PARTITIONS * PER_PARTITION) as usize);
    wait_for("every record handled", &ledger, || {
        ledger.lock().unwrap().acked.len() >= published.len()
    })
    .await;
    let _ = stop_watch.send(true);
    watcher.await.unwrap();
    b.leave().await;
    c.leave().await;

    // Every member stopped: the ledger is complete.
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let twice = ledger.acked.values().filter(|&&n| n > 1).count();
    println!(
        "handled per member {:?}; delivered again (count > 1) {}; handled twice {twice}; \
         {} ownership samples; {:?} in all",
        ledger.handled,
        ledger.redelivered,
        samples.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert!(
        ledger.violations.is_empty(),
        "{} violations, first ones: {:?}",
        ledger.violations.len(),
        &ledger.violations[..ledger.violations.len().min(10)]
    );
    let acked: BTreeSet<Offset> = ledger.acked.keys().copied().collect();
    assert_eq!(acked, published, "every published record handled, no other");
    assert_eq!(twice, 0, "no member died: every record handled once");
    for me in 0..3 {
        assert!(
            ledger.handled.get(&me).is_some_and(|&n| n > 0),
            "member {me} handled nothing"
        );
    }

    // Every partition's progress committed to the end.
    let d = client.describe_group(GROUP).await.unwrap();
    assert_eq!(d.partitions.len(), PARTITIONS as usize);
    for p in &d.partitions {
        assert_eq!(
            (p.lag, p.delivered_unacked, p.committed),
            (0, 0, u64::from(PER_PARTITION)),
            "partition {}",
            p.partition
        );
    }
}

/// The broker lists records of every batch a `Deliveries` message
/// carries; a message with more batches than the batch memory keeps
/// (a backlog written in small batches, or a takeover's queued records)
/// must still be read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_of_more_batches_than_the_batch_memory_is_handled_whole() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new(TOPIC)).await.unwrap();
    let producer = client.producer(ProducerConfig::default());
    // Twelve batches of three records: one flush each.
    for batch in 0..12u64 {
        for i in 0..3 {
            let r = Record {
                value: Bytes::from((batch * 3 + i).to_string()),
                ..Default::default()
            };
            drop(producer.send_to(TOPIC, 0, r).await.expect("send"));
        }
        producer.flush().await.expect("flush");
    }
    let mut consumer = client
        .group_consumer(GroupConsumerConfig::new(GROUP, "m"))
        .expect("consumer");
    consumer
        .assign(1, vec![(TOPIC.to_string(), 0)])
        .await
        .expect("assign");
    for expected in 0..36u64 {
        let r = tokio::time::timeout(STEP, consumer.next())
            .await
            .expect("a record in time")
            .expect("consumer open")
            .expect("a record, not an error");
        assert_eq!(
            (r.offset, &r.value[..]),
            (expected, expected.to_string().as_bytes())
        );
        r.ack();
    }
    consumer.close().await.expect("close");
}
