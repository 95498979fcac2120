//! A consumer group member (`Membership` driving a `GroupConsumer`)
//! against a real broker: a slow member with `max_in_flight = 4` never
//! holds more than 4 unacknowledged records with 100,000 published,
//! and a reset to a time makes the group handle exactly the records from
//! that time again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Broker;
use covet_client::{
    Client, GroupConsumer, GroupConsumerConfig, GroupRecord, Membership, ProducerConfig, Record,
    StartPosition, TopicSpec,
};

const STEP: Duration = Duration::from_secs(20);

async fn member(
    client: &Client,
    group: &str,
    topic: &str,
    max_in_flight: u32,
) -> (GroupConsumer, Membership) {
    let consumer = client
        .group_consumer(GroupConsumerConfig {
            max_in_flight,
            ..GroupConsumerConfig::new(group, "m")
        })
        .expect("consumer");
    let membership = Membership::join(
        client.clone(),
        group,
        vec![topic.to_string()],
        Duration::from_secs(10),
        Arc::new(consumer.assigner()),
    )
    .await
    .expect("join");
    (consumer, membership)
}

async fn next(c: &mut GroupConsumer, wait: Duration) -> Option<GroupRecord> {
    match tokio::time::timeout(wait, c.next()).await {
        Ok(Some(Ok(r))) => Some(r),
        Ok(Some(Err(e))) => panic!("consumer error: {e}"),
        Ok(None) => panic!("consumer closed"),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_never_holds_more_than_max_in_flight() {
    const RECORDS: u64 = 100_000;
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();
    let (mut consumer, membership) = member(&client, "slow", "t", 4).await;
    let producer = client.producer(ProducerConfig::default());
    for i in 0..RECORDS {
        let r = Record {
            value: Bytes::from(i.to_string()),
            ..Default::default()
        };
        // Deliveries resolve on their own; flush waits for all.
        drop(producer.send_to("t", 0, r).await.expect("send"));
    }
    tokio::time::timeout(STEP, producer.flush())
        .await
        .expect("published in time")
        .expect("published");
    // The member is slow: it takes what it can get without acknowledging,
    // then acknowledges it all, round after round. The broker's credit
    // stops it at 4 every time, whatever the backlog.
    let mut expected = 0u64;
    for _ in 0..20 {
        let mut held = Vec::new();
        while let Some(r) = next(&mut consumer, Duration::from_millis(100)).await {
            held.push(r);
            assert!(held.len() <= 4, "holding {} unacknowledged", held.len());
        }
        assert_eq!(held.len(), 4, "the member fills its credit");
        for r in held {
            assert_eq!(r.offset, expected, "in order, each once");
            expected += 1;
            r.ack();
        }
    }
    membership.leave().await.expect("leave");
    // The backlog stayed on the broker's disk: the lag is what was not
    // handled.
    let d = client.describe_group("slow").await.unwrap();
    assert_eq!(d.partitions[0].committed, expected);
    assert_eq!(d.partitions[0].lag, RECORDS - expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_to_a_time_hands_out_exactly_the_records_from_then_again() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();
    let producer = client.producer(ProducerConfig::default());
    let t0 = 1_700_000_000_000;
    let t1 = t0 + 60_000;
    for (from, ts) in [(0, t0), (10, t1)] {
        for i in from..from + 10 {
            let r = Record {
                value: Bytes::from(format!("r{i}")),
                timestamp_ms: ts,
                ..Default::default()
            };
            drop(producer.send_to("t", 0, r).await.unwrap());
        }
        // The two times in different batches: time lookups find batches.
        producer.flush().await.unwrap();
    }

    let (mut consumer, membership) = member(&client, "g", "t", 100).await;
    for expected in 0..20 {
        let r = next(&mut consumer, STEP).await.expect("a record");
        assert_eq!(r.offset, expected);
        r.ack();
    }
    membership.leave().await.unwrap();
    consumer.close().await.unwrap();

    let reset = client
        .reset_group("g", "t", None, StartPosition::Timestamp(t1), false)
        .await
        .unwrap();
    assert_eq!(reset[0].committed, 10);
    let (mut consumer, membership) = member(&client, "g", "t", 100).await;
    for expected in 10..20 {
        let r = next(&mut consumer, STEP).await.expect("a record again");
        assert_eq!(
            (r.offset, r.value.clone()),
            (expected, Bytes::from(format!("r{expected}")))
        );
        r.ack();
    }
    assert!(
        next(&mut consumer, Duration::from_millis(400))
            .await
            .is_none(),
        "nothing before the reset time"
    );
    membership.leave().await.unwrap();
}
