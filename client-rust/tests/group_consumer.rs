//! The group consumer's partition sessions against a real `covet broker`
//! process: every record of two partitions delivered once and committed;
//! a nack delivers again; per-key order while the application acks out
//! of order; a released partition taken over by a newer generation with
//! exactly the unacknowledged records; fencing; dead letters after
//! `max_deliveries` while the application holds the record.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Broker;
use covet_client::{
    Client, GroupConsumer, GroupConsumerConfig, GroupRecord, ProducerConfig, Reason, Record,
    StartPosition, TopicSpec,
};

/// Bounds every wait of these tests.
const STEP: Duration = Duration::from_secs(20);
/// How long "nothing more comes" is watched.
const QUIET: Duration = Duration::from_millis(400);

fn config(member: &str) -> GroupConsumerConfig {
    GroupConsumerConfig {
        max_in_flight: 50,
        ..GroupConsumerConfig::new("g", member)
    }
}

/// Creates `topic` with `partitions` partitions and writes `records`
/// (partition, key, value) to it, in order.
async fn produce(
    client: &Client,
    topic: &str,
    partitions: u32,
    records: &[(u32, Option<&str>, String)],
) {
    client
        .create_topic(TopicSpec::new(topic).partitions(partitions))
        .await
        .expect("create topic");
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for (p, key, value) in records {
        let r = Record {
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ..Default::default()
        };
        acks.push(producer.send_to(topic, *p, r).await.expect("send"));
    }
    for a in acks {
        tokio::time::timeout(STEP, a)
            .await
            .expect("produced in time")
            .expect("produced");
    }
}

/// The next record, within [`STEP`].
async fn next(c: &mut GroupConsumer) -> GroupRecord {
    tokio::time::timeout(STEP, c.next())
        .await
        .expect("a record in time")
        .expect("consumer open")
        .expect("a record, not an error")
}

async fn take(c: &mut GroupConsumer, n: usize) -> Vec<GroupRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(next(c).await);
    }
    out
}

/// Asserts that nothing arrives within [`QUIET`].
async fn assert_quiet(c: &mut GroupConsumer, why: &str) {
    if let Ok(got) = tokio::time::timeout(QUIET, c.next()).await {
        let got = got.map(|r| r.map(|r| (r.partition, r.offset, r.delivery_count)));
        panic!("{why}: got {got:?}");
    }
}

/// Waits until `group`'s committed offsets on `topic` are `expected`
/// (partition → committed).
async fn wait_committed(client: &Client, topic: &str, expected: &[(u32, u64)]) {
    let expected: BTreeMap<u32, u64> = expected.iter().copied().collect();
    let deadline = tokio::time::Instant::now() + STEP;
    let mut last = BTreeMap::new();
    while tokio::time::Instant::now() < deadline {
        let d = client.describe_group("g").await.expect("describe group");
        last = d
            .partitions
            .iter()
            .filter(|p| p.topic == topic)
            .map(|p| (p.partition, p.committed))
            .collect();
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("committed offsets {last:?}, expected {expected:?}");
}

fn values(n: u64) -> impl Iterator<Item = String> {
    (0..n).map(|i| i.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_of_two_partitions_is_delivered_once_and_committed() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = (0..2)
        .flat_map(|p| values(10).map(move |v| (p, None, v)))
        .collect();
    produce(&client, "t", 2, &records).await;

    let mut c = client.group_consumer(config("m1")).unwrap();
    let parts = vec![("t".to_string(), 0), ("t".to_string(), 1)];
    c.assign(1, parts.clone()).await.unwrap();
    assert_eq!(c.owned(), parts);
    let mut seen = HashSet::new();
    for r in take(&mut c, 20).await {
        assert_eq!(r.delivery_count, 1);
        assert_eq!(&r.value[..], r.offset.to_string().as_bytes());
        assert!(seen.insert((r.partition, r.offset)), "delivered twice");
        r.ack();
    }
    assert_quiet(&mut c, "every record was acknowledged").await;
    wait_committed(&client, "t", &[(0, 10), (1, 10)]).await;
    // Closed through an assigner (as a coordinator would on leaving):
    // nothing owned, the stream ends, a later assign is refused.
    let assigner = c.assigner();
    assigner.close().await.unwrap();
    assert!(c.owned().is_empty());
    let end = tokio::time::timeout(STEP, c.next()).await.expect("in time");
    assert!(end.is_none(), "the stream ends once closed");
    assert!(matches!(
        assigner.assign(2, parts).await,
        Err(covet_client::Error::Closed)
    ));
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_record_comes_again_with_delivery_count_two() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(3).map(|v| (0, None, v)).collect();
    produce(&client, "t", 1, &records).await;

    let mut c = client.group_consumer(config("m1")).unwrap();
    c.assign(1, vec![("t".into(), 0)]).await.unwrap();
    let mut got = take(&mut c, 3).await;
    let one = got.remove(1);
    assert_eq!((one.offset, one.delivery_count), (1, 1));
    one.nack(Duration::ZERO);
    got.into_iter().for_each(GroupRecord::ack);
    let again = next(&mut c).await;
    assert_eq!((again.offset, again.delivery_count), (1, 2));
    assert_eq!(&again.value[..], b"1");
    again.ack();
    wait_committed(&client, "t", &[(0, 3)]).await;
    assert_quiet(&mut c, "all acknowledged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_never_has_two_records_in_hand_and_its_records_come_in_offset_order() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    const KEYS: [&str; 4] = ["a", "b", "c", "d"];
    // Every fifth record has no key.
    let records: Vec<_> = (0..120u64)
        .map(|i| {
            let key = (i % 5 != 4).then(|| KEYS[(i % 4) as usize]);
            (0, key, i.to_string())
        })
        .collect();
    produce(&client, "t", 1, &records).await;

    let mut c = client
        .group_consumer(GroupConsumerConfig {
            max_in_flight: 16,
            ..config("m1")
        })
        .unwrap();
    c.assign(1, vec![("t".into(), 0)]).await.unwrap();
    let in_hand: Arc<Mutex<HashSet<Bytes>>> = Arc::default();
    let mut by_key: HashMap<Option<Bytes>, Vec<u64>> = HashMap::new();
    let mut handlers = Vec::new();
    let mut most_in_hand = 0;
    for i in 0..records.len() {
        let r = next(&mut c).await;
        assert_eq!(r.delivery_count, 1, "nothing is delivered twice");
        by_key.entry(r.key.clone()).or_default().push(r.offset);
        if let Some(k) = &r.key {
            let mut held = in_hand.lock().unwrap();
            assert!(held.insert(k.clone()), "two records of key {k:?} in hand");
            most_in_hand = most_in_hand.max(held.len());
        }
        // Handlers finish in an order of their own: acks go out of order.
        let in_hand = in_hand.clone();
        handlers.push(tokio::spawn(async move {
            for _ in 0..(i * 7) % 13 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(((i * 3) % 5) as u64)).await;
            if let Some(k) = &r.key {
                in_hand.lock().unwrap().remove(k);
            }
            r.ack();
        }));
    }
    for h in handlers {
        h.await.unwrap();
    }
    assert!(most_in_hand > 1, "keys were handled concurrently");
    let mut total = 0;
    for (key, offsets) in &by_key {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "key {key:?} out of offset order: {offsets:?}"
        );
        total += offsets.len();
    }
    assert_eq!(total, records.len());
    wait_committed(&client, "t", &[(0, 120)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_partition_goes_to_a_newer_generation_with_exactly_its_unacked_records() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = (0..2)
        .flat_map(|p| values(6).map(move |v| (p, None, v)))
        .collect();
    produce(&client, "t", 2, &records).await;

    let grace0 = |member| GroupConsumerConfig {
        release_grace: Duration::ZERO,
        ..config(member)
    };
    let mut a = client.group_consumer(grace0("a")).unwrap();
    a.assign(1, vec![("t".into(), 0), ("t".into(), 1)])
        .await
        .unwrap();
    let mut kept = Vec::new();
    for r in take(&mut a, 12).await {
        // Partition 1's records 3, 4 and 5 stay in hand, unacknowledged.
        if r.partition == 1 && r.offset >= 3 {
            kept.push(r);
        } else {
            r.ack();
        }
    }
    a.assign(2, vec![("t".into(), 0)]).await.unwrap();
    assert_eq!(a.owned(), vec![("t".to_string(), 0)]);
    // Released: its progress is committed when `assign` returns.
    let d = client.describe_group("g").await.unwrap();
    let p1 = d.partitions.iter().find(|p| p.partition == 1).unwrap();
    assert_eq!(p1.committed, 3);

    let mut b = client.group_consumer(grace0("b")).unwrap();
    b.assign(2, vec![("t".into(), 1)]).await.unwrap();
    let again = take(&mut b, 3).await;
    let seen: Vec<(u32, u64, u32)> = again
        .iter()
        .map(|r| (r.partition, r.offset, r.delivery_count))
        .collect();
    assert_eq!(seen, vec![(1, 3, 2), (1, 4, 2), (1, 5, 2)]);
    again.into_iter().for_each(GroupRecord::ack);
    assert_quiet(&mut b, "only the unacknowledged records come again").await;

    // The acks of the released records go nowhere; `a` keeps consuming
    // the partition it kept.
    kept.into_iter().for_each(GroupRecord::ack);
    produce_more(&client, "t", 0, "6").await;
    let r = next(&mut a).await;
    assert_eq!((r.partition, r.offset), (0, 6));
    assert_quiet(&mut a, "nothing of the released partition").await;
}

async fn produce_more(client: &Client, topic: &str, partition: u32, value: &str) {
    let producer = client.producer(ProducerConfig::default());
    let r = Record {
        value: Bytes::copy_from_slice(value.as_bytes()),
        ..Default::default()
    };
    let ack = producer.send_to(topic, partition, r).await.unwrap();
    tokio::time::timeout(STEP, ack).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_generation_fences_the_session_and_the_error_reaches_next() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(2).map(|v| (0, None, v)).collect();
    produce(&client, "t", 1, &records).await;

    let mut a = client.group_consumer(config("a")).unwrap();
    a.assign(1, vec![("t".into(), 0)]).await.unwrap();
    let _held = take(&mut a, 2).await;
    let mut b = client.group_consumer(config("b")).unwrap();
    b.assign(2, vec![("t".into(), 0)]).await.unwrap();
    let err = tokio::time::timeout(STEP, a.next())
        .await
        .expect("in time")
        .expect("open")
        .expect_err("fenced");
    assert_eq!(err.reason(), Some(Reason::Fenced), "{err}");
    assert!(err.to_string().contains("t/0"), "{err}");
    assert!(a.owned().is_empty());
    assert_eq!(take(&mut b, 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_never_acked_goes_to_the_dead_letter_topic() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(2).map(|v| (0, None, v)).collect();
    produce(&client, "jobs", 1, &records).await;

    let mut c = client
        .group_consumer(GroupConsumerConfig {
            max_in_flight: 1,
            ack_timeout: Duration::from_millis(300),
            max_deliveries: 2,
            ..config("m1")
        })
        .unwrap();
    c.assign(1, vec![("jobs".into(), 0)]).await.unwrap();
    let held = next(&mut c).await;
    assert_eq!((held.offset, held.delivery_count), (0, 1));
    // Held past two ack timeouts: the broker's second delivery is not
    // handed out while the first is in hand, and then record 0 is a dead
    // letter and record 1 comes.
    let r = next(&mut c).await;
    assert_eq!((r.offset, r.delivery_count), (1, 1));
    r.ack();
    held.ack();

    let mut dlq = client
        .open_partition("jobs.dlq", 0, StartPosition::Earliest, 10)
        .await
        .unwrap();
    let dead = tokio::time::timeout(STEP, dlq.next_batch())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].value[..], b"0");
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())
    };
    assert_eq!(header("covet-dlq-deliveries").as_deref(), Some("2"));
    assert_eq!(header("covet-dlq-group").as_deref(), Some("g"));
    wait_committed(&client, "jobs", &[(0, 2)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    for (cfg, why) in [
        (
            GroupConsumerConfig {
                max_in_flight: 0,
                ..config("m")
            },
            "max_in_flight 0",
        ),
        (
            GroupConsumerConfig {
                max_in_flight: 10_001,
                ..config("m")
            },
            "max_in_flight above the limit",
        ),
        (
            GroupConsumerConfig {
                ack_timeout: Duration::ZERO,
                ..config("m")
            },
            "ack_timeout 0",
        ),
    ] {
        assert!(
            matches!(
                client.group_consumer(cfg),
                Err(covet_client::Error::InvalidArgument(_))
            ),
            "{why}"
        );
    }
    let c = client.group_consumer(config("m")).unwrap();
    c.assign(5, vec![]).await.unwrap();
    assert!(matches!(
        c.assign(4, vec![]).await,
        Err(covet_client::Error::InvalidArgument(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_opened_again_and_nothing_is_handed_out_twice() {
    let mut broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(6).map(|v| (0, None, v)).collect();
    produce(&client, "t", 1, &records).await;

    // A short ack timeout: the broker's session of the lost connection
    // lives on for a moment after the broker resumes and may take a
    // record out of the shared cursor (same generation, so not fenced);
    // that record comes back only after the ack timeout.
    let mut c = client
        .group_consumer(GroupConsumerConfig {
            max_in_flight: 3,
            ack_timeout: Duration::from_secs(2),
            ..config("m1")
        })
        .unwrap();
    c.assign(1, vec![("t".into(), 0)]).await.unwrap();
    let mut first = take(&mut c, 3).await.into_iter();
    let mut offsets: Vec<u64> = Vec::new();
    let zero = first.next().unwrap();
    offsets.push(zero.offset);
    zero.ack();
    // The broker stops answering for longer than the client's keepalive
    // takes to declare the connection dead (1 s + 2 s): the session's
    // stream fails and is opened again once the broker answers. The
    // records in hand meanwhile are acknowledged across the reconnect.
    broker.pause();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for r in first {
        offsets.push(r.offset);
        r.ack();
    }
    broker.resume();
    for r in take(&mut c, 3).await {
        offsets.push(r.offset);
        r.ack();
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..6).collect::<Vec<_>>());
    assert_quiet(&mut c, "nothing is handed out twice").await;
    wait_committed(&client, "t", &[(0, 6)]).await;
    assert_eq!(c.owned(), vec![("t".to_string(), 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_fenced_session_not_yet_taken_are_not_handed_out() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(4).map(|v| (0, None, v)).collect();
    produce(&client, "t", 1, &records).await;

    let mut a = client.group_consumer(config("a")).unwrap();
    a.assign(1, vec![("t".into(), 0)]).await.unwrap();
    // The broker sends all four in one message: once the first is taken,
    // the other three wait in `a` to be taken.
    let first = next(&mut a).await;
    assert_eq!(first.offset, 0);
    let mut b = client.group_consumer(config("b")).unwrap();
    b.assign(2, vec![("t".into(), 0)]).await.unwrap();
    // Once `a`'s session has ended (fenced), what it still holds for the
    // application is not handed out; the error is.
    assert!(common::wait_until(STEP, || a.owned().is_empty()).await);
    let got = tokio::time::timeout(STEP, a.next())
        .await
        .expect("in time")
        .expect("open")
        .map(|r| r.offset);
    assert_eq!(
        got.map_err(|e| e.reason()),
        Err(Some(Reason::Fenced)),
        "records of the fenced session are the new owner's"
    );
    assert_eq!(take(&mut b, 4).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_waits_for_the_records_in_hand_and_their_acks_count() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(3).map(|v| (0, None, v)).collect();
    produce(&client, "t", 1, &records).await;

    let mut a = client
        .group_consumer(GroupConsumerConfig {
            release_grace: STEP,
            ..config("a")
        })
        .unwrap();
    a.assign(1, vec![("t".into(), 0)]).await.unwrap();
    let mut got = take(&mut a, 3).await.into_iter();
    got.next().unwrap().ack();
    let (one, two) = (got.next().unwrap(), got.next().unwrap());
    let assigner = a.assigner();
    let mut release = tokio::spawn(async move { assigner.assign(2, vec![]).await });
    assert!(
        tokio::time::timeout(QUIET, &mut release).await.is_err(),
        "the release waits while records are in hand"
    );
    assert_eq!(
        a.owned(),
        vec![("t".to_string(), 0)],
        "still owned meanwhile"
    );
    one.ack();
    two.nack(Duration::ZERO);
    tokio::time::timeout(STEP, release)
        .await
        .expect("released once nothing is in hand")
        .unwrap()
        .unwrap();
    assert!(a.owned().is_empty());
    let d = client.describe_group("g").await.unwrap();
    assert_eq!(
        d.partitions[0].committed, 2,
        "the ack made meanwhile counts"
    );

    let mut b = client.group_consumer(config("b")).unwrap();
    b.assign(3, vec![("t".into(), 0)]).await.unwrap();
    let r = next(&mut b).await;
    assert_eq!((r.offset, r.delivery_count), (2, 2));
    r.ack();
    assert_quiet(&mut b, "only the nacked record comes again").await;
}

/// Records this layer holds back behind a record of the same key are not
/// with the application: their ack deadlines are extended while they wait,
/// so a key whose records take longer than `ack_timeout` in all does not
/// have its later records timed out, redelivered or dead-lettered unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_behind_their_key_do_not_time_out() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(4).map(|v| (0, Some("k"), v)).collect();
    produce(&client, "jobs", 1, &records).await;

    let mut c = client
        .group_consumer(GroupConsumerConfig {
            max_in_flight: 10,
            ack_timeout: Duration::from_millis(1000),
            // A single timeout would make a record a dead letter.
            max_deliveries: 1,
            ..config("m1")
        })
        .unwrap();
    c.assign(1, vec![("jobs".into(), 0)]).await.unwrap();
    // Each record is handled in 700 ms, within its own ack timeout; the
    // last waits about 2.1 s behind the others.
    for expected in 0..4 {
        let r = next(&mut c).await;
        assert_eq!((r.offset, r.delivery_count), (expected, 1));
        tokio::time::sleep(Duration::from_millis(700)).await;
        r.ack();
    }
    wait_committed(&client, "jobs", &[(0, 4)]).await;
    let dead = match client.describe_topic("jobs.dlq").await {
        Ok(t) => t.partitions.iter().map(|p| p.high_watermark).sum(),
        Err(e) if e.reason() == Some(Reason::UnknownTopic) => 0,
        Err(e) => panic!("describe jobs.dlq: {e}"),
    };
    assert_eq!(dead, 0, "a record waiting behind its key was dead-lettered");
    c.close().await.unwrap();
}

/// Records a released session received and never handed to the
/// application (here: held back behind a record of the same key) are given
/// back uncounted: the next owner gets them with their delivery count
/// unchanged, not as redeliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_released_session_never_handed_out_keep_their_count() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    let records: Vec<_> = values(5).map(|v| (0, Some("k"), v)).collect();
    produce(&client, "t", 1, &records).await;

    let grace0 = |member| GroupConsumerConfig {
        release_grace: Duration::ZERO,
        ..config(member)
    };
    let mut a = client.group_consumer(grace0("a")).unwrap();
    a.assign(1, vec![("t".into(), 0)]).await.unwrap();
    // Record 0 in hand; 1 to 4 wait behind it (same key), unseen.
    let held = next(&mut a).await;
    assert_eq!(held.offset, 0);
    wait_for_delivered(&client, 5).await;
    a.assign(2, vec![]).await.unwrap();

    let mut b = client.group_consumer(grace0("b")).unwrap();
    b.assign(2, vec![("t".into(), 0)]).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = next(&mut b).await;
        seen.push((r.offset, r.delivery_count));
        r.ack();
    }
    assert_eq!(
        seen,
        vec![(0, 2), (1, 1), (2, 1), (3, 1), (4, 1)],
        "only the record the application held counts a second delivery"
    );
    wait_committed(&client, "t", &[(0, 5)]).await;
    drop(held);
}

/// Waits until the group's last commit shows `n` records delivered and
/// unacknowledged on partition 0 (the broker commits every 200 ms).
async fn wait_for_delivered(client: &Client, n: u32) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let d = client.describe_group("g").await.expect("describe group");
        let out = d.partitions.first().map_or(0, |p| p.delivered_unacked);
        if out == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{out} delivered, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
