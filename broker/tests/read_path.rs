//! The read path from the log to `Subscription::next`, against a real
//! broker: consecutive batches travel together in one subscribe message,
//! the credit rule holds across such messages, and many small batches come
//! back in order, exactly once.

mod common;

use std::time::Duration;

use common::Broker;
use covet_client::{Client, Record, StartPosition, SubscriptionOptions, TopicSpec};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{subscribe_request, subscribe_response, Position, ProduceRequest};
use covet_protocol::api::{SubscribeOpen, SubscribeRequest, SubscribeResponse};
use covet_protocol::batch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use common::raw::{channel, STEP};

/// Writes `batches` batches of `per_batch` records to partition 0 of
/// `topic` through one pipelined produce stream, bypassing the client's
/// producer so that every batch is stored exactly as built. Record `i`'s
/// value is `i` in decimal, so its offset is `i`.
async fn preload(addr: &str, topic: &str, batches: u64, per_batch: u64) {
    let mut client = CovetClient::new(channel(addr).await);
    let requests = (0..batches).map({
        let topic = topic.to_string();
        move |b| {
            let records: Vec<Record> = (b * per_batch..(b + 1) * per_batch)
                .map(|i| Record {
                    value: i.to_string().into(),
                    timestamp_ms: 1,
                    ..Default::default()
                })
                .collect();
            ProduceRequest {
                request_id: b,
                topic: topic.clone(),
                partition: 0,
                batch: batch::encode(&records).expect("records"),
            }
        }
    });
    // The request side stays open until every answer is in.
    let requests =
        tokio_stream::StreamExt::chain(tokio_stream::iter(requests), futures::stream::pending());
    let mut answers = client.produce(requests).await.unwrap().into_inner();
    for _ in 0..batches {
        let a = tokio::time::timeout(STEP, answers.message())
            .await
            .expect("an answer in time")
            .expect("produce stream")
            .expect("an answer per request");
        assert!(a.error.is_none(), "{a:?}");
        assert_eq!(a.base_offset, a.request_id * per_batch);
    }
}

/// A subscribe stream on partition 0 opened with `credit`; more credit is
/// granted through the returned sender.
async fn subscribe_raw(
    addr: &str,
    topic: &str,
    from: u64,
    credit: u64,
) -> (mpsc::Sender<SubscribeRequest>, Streaming<SubscribeResponse>) {
    let (tx, rx) = mpsc::channel(4);
    let open = SubscribeOpen {
        topic: topic.into(),
        partition: 0,
        from: Some(Position {
            kind: Some(covet_protocol::api::position::Kind::Offset(from)),
        }),
        credit,
        allow_follower: false,
        group: None,
    };
    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Open(open)),
    })
    .await
    .unwrap();
    let mut responses = CovetClient::new(channel(addr).await)
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(STEP, responses.message()).await;
    assert!(matches!(
        first.unwrap().unwrap().and_then(|m| m.kind),
        Some(subscribe_response::Kind::Opened(_))
    ));
    (tx, responses)
}

/// The batches of the next message, or `None` if none arrives within
/// `wait`.
async fn next_message(
    responses: &mut Streaming<SubscribeResponse>,
    wait: Duration,
) -> Option<Vec<bytes::Bytes>> {
    let msg = tokio::time::timeout(wait, responses.message()).await.ok()?;
    match msg.expect("stream").expect("open").kind {
        Some(subscribe_response::Kind::Batches(b)) => {
            assert!(!b.batches.is_empty(), "an empty message");
            Some(b.batches)
        }
        Some(subscribe_response::Kind::Batch(b)) => Some(vec![b.batch]),
        other => panic!("unexpected {other:?}"),
    }
}

/// Offsets of every record in `batches`, checked.
fn offsets(batches: &[bytes::Bytes]) -> Vec<u64> {
    batches
        .iter()
        .flat_map(|b| batch::decode_records(b).expect("valid batch"))
        .map(|r| r.offset)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_batches_travel_together_within_the_credit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("small")).await.unwrap();
    preload(&broker.addr, "small", 300, 1).await;

    let (credit, mut responses) = subscribe_raw(&broker.addr, "small", 0, 10).await;
    // The ten batches the credit covers arrive as one message.
    let first = next_message(&mut responses, STEP).await.expect("a message");
    assert_eq!(offsets(&first), (0..10).collect::<Vec<_>>());
    // And nothing past the credit.
    let more = next_message(&mut responses, Duration::from_millis(300)).await;
    assert!(
        more.is_none(),
        "sent past the credit: {:?}",
        more.map(|m| offsets(&m))
    );

    credit
        .send(SubscribeRequest {
            kind: Some(subscribe_request::Kind::Credit(290)),
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut messages = 0;
    while got.len() < 290 {
        let m = next_message(&mut responses, STEP).await.expect("a message");
        got.extend(offsets(&m));
        messages += 1;
    }
    assert_eq!(got, (10..300).collect::<Vec<_>>());
    // A message per batch would be 290.
    assert!(
        messages <= 3,
        "{messages} messages for 290 one-record batches"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_message_carries_at_most_the_credit_plus_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("three")).await.unwrap();
    preload(&broker.addr, "three", 20, 3).await;

    // From offset 1 with 4 credits: the batch [0, 3) costs 2 (records 1
    // and 2), the batch [3, 6) takes the credit below zero, and the
    // broker stops there: 5 records past the position, credit + one batch.
    let (credit, mut responses) = subscribe_raw(&broker.addr, "three", 1, 4).await;
    let first = next_message(&mut responses, STEP).await.expect("a message");
    assert_eq!(offsets(&first), (0..6).collect::<Vec<_>>());
    let more = next_message(&mut responses, Duration::from_millis(300)).await;
    assert!(
        more.is_none(),
        "sent past the credit: {:?}",
        more.map(|m| offsets(&m))
    );

    // Credit 1 pays off the debt of 1 and leaves nothing: still nothing.
    let grant = |n| SubscribeRequest {
        kind: Some(subscribe_request::Kind::Credit(n)),
    };
    credit.send(grant(1)).await.unwrap();
    let more = next_message(&mut responses, Duration::from_millis(300)).await;
    assert!(
        more.is_none(),
        "sent without credit: {:?}",
        more.map(|m| offsets(&m))
    );
    credit.send(grant(7)).await.unwrap();
    let m = next_message(&mut responses, STEP).await.expect("a message");
    assert_eq!(offsets(&m), (6..15).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_below_the_start_offset_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("skip")).await.unwrap();
    preload(&broker.addr, "skip", 10, 3).await;

    let mut options = SubscriptionOptions::new("skip", StartPosition::Offset(5));
    options.window = 100;
    let mut sub = client.subscribe(options).await.unwrap();
    for want in 5..30u64 {
        let r = tokio::time::timeout(STEP, sub.next())
            .await
            .expect("a record in time")
            .expect("open")
            .expect("valid");
        assert_eq!(
            (r.offset, &r.value[..]),
            (want, want.to_string().as_bytes())
        );
    }

    let mut stream = client
        .open_partition("skip", 0, StartPosition::Offset(4), 100)
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 26 {
        let batch = tokio::time::timeout(STEP, stream.next_batch())
            .await
            .expect("a batch in time")
            .expect("read")
            .expect("open");
        got.extend(batch.iter().map(|r| r.offset));
    }
    assert_eq!(got, (4..30).collect::<Vec<_>>());
    assert_eq!(stream.position(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_one_record_batches_come_back_once_in_order() {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("many")).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(240),
        preload(&broker.addr, "many", N, 1),
    )
    .await
    .expect("preloaded in time");

    let mut options = SubscriptionOptions::new("many", StartPosition::Earliest);
    options.window = 2_000;
    let mut sub = client.subscribe(options).await.unwrap();
    let read = async {
        for want in 0..N {
            let r = sub.next().await.expect("open").expect("valid");
            assert_eq!(r.offset, want);
            assert_eq!(&r.value[..], want.to_string().as_bytes());
        }
    };
    tokio::time::timeout(Duration::from_secs(240), read)
        .await
        .expect("read back in time");
    // Nothing more: no record delivered twice.
    let more = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(more.is_err(), "a record past the end: {more:?}");
}
