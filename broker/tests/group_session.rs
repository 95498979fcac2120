//! A consumer group's session on one partition, against a real broker and
//! over the raw protocol (the group consumer of the Rust client is built
//! on it): delivery within `max_in_flight`, acknowledgements that commit
//! the contiguous prefix and survive a restart, redelivery after a nack or
//! an ack timeout with the delivery count raised, dead letters after
//! `max_deliveries`, and fencing by generation.

mod common;

use std::time::Duration;

use common::raw::{channel, STEP};
use common::Broker;
use covet_client::{Client, ProducerConfig, Record, TopicSpec};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{subscribe_request, subscribe_response, Acks, GroupSession, Nack};
use covet_protocol::api::{Opened, SubscribeOpen, SubscribeRequest, SubscribeResponse};
use covet_protocol::batch;
use covet_protocol::reason::{reason_of, Reason};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// A delivered record: offset, delivery count, value.
type Got = (u64, u32, String);

struct Member {
    tx: mpsc::Sender<SubscribeRequest>,
    rx: Streaming<SubscribeResponse>,
    opened: Opened,
    /// Values of every record in the batches received on this stream: the
    /// broker does not send a batch again while the client keeps it.
    values: std::collections::HashMap<u64, String>,
}

fn session(group: &str, generation: u64, max_in_flight: u32) -> GroupSession {
    GroupSession {
        group: group.into(),
        member_id: format!("m{generation}"),
        generation,
        max_in_flight,
        ..Default::default()
    }
}

async fn join(addr: &str, topic: &str, g: GroupSession) -> Result<Member, Status> {
    let (tx, rx) = mpsc::channel(16);
    let open = SubscribeOpen {
        topic: topic.into(),
        partition: 0,
        group: Some(g),
        ..Default::default()
    };
    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Open(open)),
    })
    .await
    .unwrap();
    let mut rx = CovetClient::new(channel(addr).await)
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(STEP, rx.message())
        .await
        .expect("opened in time")?;
    match first.and_then(|m| m.kind) {
        Some(subscribe_response::Kind::Opened(opened)) => Ok(Member {
            tx,
            rx,
            opened,
            values: std::collections::HashMap::new(),
        }),
        other => panic!("expected opened, got {other:?}"),
    }
}

impl Member {
    /// The records of the next message, or `None` if none comes within
    /// `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Vec<Got>> {
        let msg = tokio::time::timeout(wait, self.rx.message()).await.ok()?;
        match msg.expect("stream open").expect("a message").kind {
            Some(subscribe_response::Kind::Deliveries(d)) => {
                for b in &d.batches {
                    for r in batch::decode_records(b).expect("valid batch") {
                        self.values
                            .insert(r.offset, String::from_utf8(r.value.to_vec()).unwrap());
                    }
                }
                Some(
                    d.records
                        .iter()
                        .map(|r| (r.offset, r.count, self.values[&r.offset].clone()))
                        .collect(),
                )
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Collects deliveries until `n` records arrived.
    async fn take(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::new();
        while out.len() < n {
            let more = self
                .next(STEP)
                .await
                .unwrap_or_else(|| panic!("only {} of {n} records delivered", out.len()));
            out.extend(more);
        }
        out
    }

    async fn ack(&self, offsets: impl IntoIterator<Item = u64>) {
        let acks = Acks {
            offsets: offsets.into_iter().collect(),
        };
        self.tx
            .send(SubscribeRequest {
                kind: Some(subscribe_request::Kind::Acks(acks)),
            })
            .await
            .unwrap();
    }

    async fn nack(&self, offset: u64, delay_ms: u32) {
        self.tx
            .send(SubscribeRequest {
                kind: Some(subscribe_request::Kind::Nack(Nack { offset, delay_ms })),
            })
            .await
            .unwrap();
    }

    /// Ends the session from the client side and waits until the broker
    /// closed its side (it commits first).
    async fn leave(self) {
        let Member { tx, mut rx, .. } = self;
        drop(tx);
        let end = tokio::time::timeout(STEP, async {
            while let Ok(Some(_)) = rx.message().await {}
        })
        .await;
        assert!(end.is_ok(), "the session did not end");
    }
}

/// Writes records with values "0", "1", … to partition 0 of `topic`.
async fn produce(addr: &str, topic: &str, n: u64) {
    let client = Client::connect(addr).await.unwrap();
    client.create_topic(TopicSpec::new(topic)).await.unwrap();
    let producer = client.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    for i in 0..n {
        let r = Record {
            value: i.to_string().into(),
            ..Default::default()
        };
        acks.push(producer.send_to(topic, 0, r).await.unwrap());
    }
    for a in acks {
        tokio::time::timeout(STEP, a).await.unwrap().unwrap();
    }
}

fn offsets(got: &[Got]) -> Vec<u64> {
    got.iter().map(|g| g.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_stays_within_max_in_flight_and_acks_commit_the_prefix_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(dir.path(), &[]);
    produce(&broker.addr, "t", 20).await;

    let mut m = join(&broker.addr, "t", session("g", 1, 4)).await.unwrap();
    assert_eq!(
        m.opened.offset, 0,
        "a new group starts at the earliest record"
    );
    let first = m.take(4).await;
    assert_eq!(offsets(&first), vec![0, 1, 2, 3]);
    assert!(first.iter().all(|g| g.1 == 1 && g.2 == g.0.to_string()));
    assert!(
        m.next(Duration::from_millis(300)).await.is_none(),
        "more than max_in_flight delivered"
    );
    // Acknowledged out of order: 1 and 3 free two slots, the prefix stays.
    m.ack([1, 3]).await;
    assert_eq!(offsets(&m.take(2).await), vec![4, 5]);
    m.ack([0, 2, 4]).await;
    assert_eq!(offsets(&m.take(3).await), vec![6, 7, 8]);
    m.leave().await;

    // Acknowledged: 0..=4; delivered, not acknowledged: 5..=8.
    broker.terminate();
    broker.restart();
    let addr = broker.addr.clone();
    let mut m = common::wait_for(Duration::from_secs(30), || {
        let addr = addr.clone();
        async move { join(&addr, "t", session("g", 2, 4)).await.ok() }
    })
    .await
    .expect("the group session opens after the restart");
    assert_eq!(m.opened.offset, 5, "the committed prefix survived");
    let again = m.take(4).await;
    assert_eq!(
        again.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(),
        vec![(5, 2), (6, 2), (7, 2), (8, 2)],
        "delivered before: counted again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_and_timeouts_deliver_again_and_the_limit_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    produce(&broker.addr, "jobs", 3).await;

    let g = GroupSession {
        ack_timeout_ms: 500,
        max_deliveries: 3,
        ..session("workers", 1, 1)
    };
    let mut m = join(&broker.addr, "jobs", g).await.unwrap();
    assert_eq!(m.take(1).await, vec![(0, 1, "0".to_string())]);
    m.nack(0, 0).await;
    assert_eq!(m.take(1).await, vec![(0, 2, "0".to_string())]);
    // Not acknowledged in time: delivered a third time.
    assert_eq!(m.take(1).await, vec![(0, 3, "0".to_string())]);
    // The third delivery times out too: record 0 goes to jobs.dlq, and the
    // group moves on.
    assert_eq!(m.take(1).await, vec![(1, 1, "1".to_string())]);
    m.ack([1]).await;
    assert_eq!(m.take(1).await, vec![(2, 1, "2".to_string())]);

    let client = Client::connect(&broker.addr).await.unwrap();
    let dead = common::read_partition(
        &client,
        "jobs.dlq",
        0,
        covet_client::StartPosition::Earliest,
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].value[..], b"0");
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8(h.value.to_vec()).unwrap())
    };
    assert_eq!(header("covet-dlq-group").as_deref(), Some("workers"));
    assert_eq!(header("covet-dlq-topic").as_deref(), Some("jobs"));
    assert_eq!(header("covet-dlq-offset").as_deref(), Some("0"));
    assert_eq!(header("covet-dlq-deliveries").as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_generation_fences_the_older_session() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    produce(&broker.addr, "t", 10).await;

    let mut old = join(&broker.addr, "t", session("g", 2, 3)).await.unwrap();
    assert_eq!(offsets(&old.take(3).await), vec![0, 1, 2]);
    let stale = join(&broker.addr, "t", session("g", 1, 3)).await;
    assert_eq!(
        reason_of(&stale.err().expect("an older generation is refused")),
        Some(Reason::Fenced)
    );
    // Generation 3 takes over: it gets what generation 2 held, again.
    let mut new = join(&broker.addr, "t", session("g", 3, 3)).await.unwrap();
    let taken = new.take(3).await;
    assert_eq!(
        taken.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(),
        vec![(0, 2), (1, 2), (2, 2)]
    );
    let end = tokio::time::timeout(STEP, old.rx.message())
        .await
        .expect("the old session ends");
    assert_eq!(
        reason_of(&end.expect_err("ended with an error")),
        Some(Reason::Fenced)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_sessions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    produce(&broker.addr, "t", 1).await;
    for (g, why) in [
        (session("g", 1, 0), "max_in_flight 0"),
        (session("g", 1, 10_001), "max_in_flight above the limit"),
        (session("a/b", 1, 1), "bad group name"),
    ] {
        let err = join(&broker.addr, "t", g).await.err().expect(why);
        assert_eq!(reason_of(&err), Some(Reason::InvalidRequest), "{why}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_lag_and_a_reset_to_earliest_hands_out_everything_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    produce(&broker.addr, "t", 6).await;
    let client = Client::connect(&broker.addr).await.unwrap();

    let mut m = join(&broker.addr, "t", session("g", 1, 10)).await.unwrap();
    assert_eq!(offsets(&m.take(6).await), (0..6).collect::<Vec<_>>());
    m.ack(0..4).await;
    // Committed within a commit interval: describe sees lag 2.
    let described = common::wait_for(Duration::from_secs(10), || async {
        let d = client.describe_group("g").await.ok()?;
        let p = d.partitions.first()?.clone();
        (p.committed == 4).then_some(p)
    })
    .await
    .expect("the acknowledgements are committed");
    assert_eq!((described.topic.as_str(), described.partition), ("t", 0));
    assert_eq!((described.high_watermark, described.lag), (6, 2));
    assert_eq!(described.delivered_unacked, 2);
    assert_eq!(client.list_groups().await.unwrap(), vec!["g".to_string()]);

    // A member consumes: a reset is refused, unless forced (which ends
    // the member's session).
    let refused = client
        .reset_group("g", "t", None, covet_client::StartPosition::Earliest, false)
        .await
        .unwrap_err();
    assert_eq!(refused.reason(), Some(Reason::GroupActive));
    let reset = client
        .reset_group("g", "t", None, covet_client::StartPosition::Earliest, true)
        .await
        .unwrap();
    assert_eq!((reset[0].committed, reset[0].lag), (0, 6));
    let end = tokio::time::timeout(STEP, m.rx.message())
        .await
        .expect("the forced reset ends the session");
    assert_eq!(reason_of(&end.expect_err("fenced")), Some(Reason::Fenced));

    // The group handles the whole topic again, first deliveries all.
    let mut m = join(&broker.addr, "t", session("g", 2, 10)).await.unwrap();
    assert_eq!(m.opened.offset, 0);
    let again = m.take(6).await;
    assert_eq!(
        again.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(),
        (0..6).map(|o| (o, 1)).collect::<Vec<_>>()
    );
    m.ack(0..6).await;
    m.leave().await;
    let d = client.describe_group("g").await.unwrap();
    assert_eq!((d.partitions[0].committed, d.partitions[0].lag), (6, 0));

    // Latest, an offset, and deletion.
    let at = client
        .reset_group(
            "g",
            "t",
            Some(0),
            covet_client::StartPosition::Offset(3),
            false,
        )
        .await
        .unwrap();
    assert_eq!(at[0].committed, 3);
    let beyond = client
        .reset_group(
            "g",
            "t",
            Some(0),
            covet_client::StartPosition::Offset(7),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(beyond.reason(), Some(Reason::OffsetOutOfRange));
    client.delete_group("g", false).await.unwrap();
    assert!(client
        .describe_group("g")
        .await
        .unwrap()
        .partitions
        .is_empty());
    assert!(client.list_groups().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_the_same_generation_takes_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    produce(&broker.addr, "t", 10).await;

    // The member's connection is lost (as far as it knows) with three
    // records out; it reconnects with the same generation.
    let mut lost = join(&broker.addr, "t", session("g", 1, 3)).await.unwrap();
    assert_eq!(offsets(&lost.take(3).await), vec![0, 1, 2]);
    let mut again = join(&broker.addr, "t", session("g", 1, 3)).await.unwrap();
    // At once, not after the 30 s ack timeout: the new session has them.
    let taken = tokio::time::timeout(Duration::from_secs(5), again.take(3))
        .await
        .expect("the records out with the lost session come back at once");
    assert_eq!(
        taken.iter().map(|g| (g.0, g.1)).collect::<Vec<_>>(),
        vec![(0, 2), (1, 2), (2, 2)]
    );
    // The old session ends quietly and delivers nothing more.
    let end = tokio::time::timeout(STEP, lost.rx.message())
        .await
        .expect("the old session ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
    again.ack(0..3).await;
    assert_eq!(offsets(&again.take(3).await), vec![3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_client_keeps_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    // 50 records in a few batches (the producer batches naturally).
    produce(&broker.addr, "t", 50).await;
    let mut m = join(&broker.addr, "t", session("g", 1, 1)).await.unwrap();
    let mut batches_sent = 0;
    for expected in 0..10u64 {
        let msg = tokio::time::timeout(STEP, m.rx.message())
            .await
            .expect("a delivery in time")
            .expect("stream open")
            .expect("a message");
        let Some(subscribe_response::Kind::Deliveries(d)) = msg.kind else {
            panic!("expected deliveries");
        };
        batches_sent += d.batches.len();
        assert_eq!(d.records.len(), 1);
        assert_eq!(d.records[0].offset, expected);
        m.ack([expected]).await;
    }
    // Each batch travels once, not once per record it holds.
    assert!(
        batches_sent <= 3,
        "{batches_sent} batches sent for 10 records"
    );
}
