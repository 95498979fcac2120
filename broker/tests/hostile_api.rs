//! Hostile and careless clients on the public gRPC API: every refusal is
//! an error status the client can read, never a silent end of stream.

mod common;

use bytes::Bytes;
use common::raw::{self, produce_bytes};
use common::Broker;
use covet_client::{Client, Record, TopicSpec};
use covet_protocol::api::covet_client::CovetClient;
use covet_protocol::api::{
    CreateTopicRequest, DescribeTopicRequest, ProduceRequest, ProduceResponse,
};
use covet_protocol::batch;
use covet_protocol::reason::{reason_of, Reason};
use futures::StreamExt;
use prost::Message;

use common::raw::{channel, STEP};

fn batch_of(n: usize) -> Bytes {
    let records: Vec<Record> = (0..n)
        .map(|i| Record {
            value: Bytes::from(format!("value {i}")),
            ..Default::default()
        })
        .collect();
    batch::encode(&records).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_produce_message_fails_the_stream_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();

    // A good request, bytes that are no protobuf message (an unterminated
    // varint), then another good request.
    let messages = vec![
        produce_bytes(1, "t", batch_of(2)),
        Bytes::from_static(&[0xff; 6]),
        produce_bytes(3, "t", batch_of(2)),
    ];
    let mut responses = tokio::time::timeout(
        STEP,
        raw::stream::<ProduceResponse, _>(
            channel(&broker.addr).await,
            "/covet.v1.Covet/Produce",
            futures::stream::iter(messages),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let first = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .unwrap()
        .expect("the request before the bad one is answered");
    assert_eq!((first.request_id, first.error), (1, None));
    let end = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap();
    let status = end.expect_err("the stream must fail, not end with OK");
    assert_eq!(
        reason_of(&status),
        Some(Reason::InvalidRequest),
        "{status:?}"
    );
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("undecodable"), "{status:?}");
    // Only the first batch was written.
    let t = client.describe_topic("t").await.unwrap();
    assert_eq!(t.partitions[0].high_watermark, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_produce_message_fails_the_stream_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();

    // 66 MiB: past the 65 MiB message limit. Its content never matters:
    // the length prefix alone is refused.
    let huge = Bytes::from(vec![0u8; 66 << 20]);
    let messages = vec![produce_bytes(1, "t", batch_of(1)), huge];
    let mut responses = tokio::time::timeout(
        STEP,
        raw::stream::<ProduceResponse, _>(
            channel(&broker.addr).await,
            "/covet.v1.Covet/Produce",
            futures::stream::iter(messages),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let first = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .unwrap()
        .expect("the request before the huge one is answered");
    assert_eq!((first.request_id, first.error), (1, None));
    let status = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .expect_err("the stream must fail, not end with OK");
    assert_eq!(
        reason_of(&status),
        Some(Reason::BatchTooLarge),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_unknown_topic_name_gives_a_short_readable_error() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let name = "n".repeat(20_000);

    let status = CovetClient::new(channel(&broker.addr).await)
        .describe_topic(DescribeTopicRequest { name: name.clone() })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status), Some(Reason::UnknownTopic));
    assert!(
        status.message().len() <= 1024,
        "{} bytes of message",
        status.message().len()
    );
    assert!(status.message().starts_with("unknown topic 'nnn"));

    // The in-stream error of a produce request is cut the same way.
    let mut responses = raw::stream::<ProduceResponse, _>(
        channel(&broker.addr).await,
        "/covet.v1.Covet/Produce",
        futures::stream::iter(vec![produce_bytes(5, &name, batch_of(1))]),
    )
    .await
    .unwrap();
    let resp = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let error = resp.error.expect("an error");
    assert_eq!(error.reason, "UNKNOWN_TOPIC");
    assert!(error.message.len() <= 1024, "{}", error.message.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_that_would_be_negative_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let mut raw_client = CovetClient::new(channel(&broker.addr).await);
    // -1 from a client that declares the field signed arrives as 2^64 - 1.
    for (ms, bytes) in [(Some(u64::MAX), None), (None, Some(1u64 << 63))] {
        let status = raw_client
            .create_topic(CreateTopicRequest {
                name: "r".into(),
                retention_ms: ms,
                retention_bytes: bytes,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            reason_of(&status),
            Some(Reason::InvalidConfig),
            "{status:?}"
        );
        assert!(status.message().contains("negative"), "{status:?}");
    }
    let client = Client::connect(&broker.addr).await.unwrap();
    assert!(client.list_topics().await.unwrap().is_empty());
    // The largest value that is not negative is a valid "practically
    // forever".
    let info = raw_client
        .create_topic(CreateTopicRequest {
            name: "r".into(),
            retention_ms: Some(i64::MAX as u64),
            retention_bytes: Some(i64::MAX as u64),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.config.unwrap().retention_ms, i64::MAX as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_base_offset_is_ignored_whatever_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();
    let mut expected = 0;
    for sent in [u64::MAX, u64::MAX - 1, 1 << 40, 0] {
        let mut b = batch_of(3).to_vec();
        batch::stamp_base_offset(&mut b, sent);
        let mut responses = raw::stream::<ProduceResponse, _>(
            channel(&broker.addr).await,
            "/covet.v1.Covet/Produce",
            futures::stream::iter(vec![produce_bytes(1, "t", b.into())]),
        )
        .await
        .unwrap();
        let resp = tokio::time::timeout(STEP, responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(resp.error, None, "base offset {sent} sent");
        assert_eq!(resp.base_offset, expected, "stamped by the leader");
        expected += 3;
    }
    assert_eq!(
        client.describe_topic("t").await.unwrap().partitions[0].high_watermark,
        12
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_subscribe_message_fails_the_stream_with_a_reason() {
    use covet_protocol::api::{subscribe_request, SubscribeOpen, SubscribeRequest};
    use covet_protocol::api::{subscribe_response, SubscribeResponse};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();
    let open = SubscribeRequest {
        kind: Some(subscribe_request::Kind::Open(SubscribeOpen {
            topic: "t".into(),
            ..Default::default()
        })),
    };
    let messages = vec![
        Bytes::from(open.encode_to_vec()),
        Bytes::from_static(&[0xff; 6]),
    ];
    let mut responses = raw::stream::<SubscribeResponse, _>(
        channel(&broker.addr).await,
        "/covet.v1.Covet/Subscribe",
        // The request side stays open after the junk, as a live client's
        // would: the end of the stream must come from the broker.
        futures::stream::iter(messages).chain(futures::stream::pending()),
    )
    .await
    .unwrap();
    let opened = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        opened.kind,
        Some(subscribe_response::Kind::Opened(_))
    ));
    let status = tokio::time::timeout(STEP, responses.message())
        .await
        .unwrap()
        .expect_err("the stream must fail, not end with OK");
    assert_eq!(
        reason_of(&status),
        Some(Reason::InvalidRequest),
        "{status:?}"
    );
}

/// Opens a subscription with `open` and returns its first answer: the
/// `Opened` offset, or the status that refused it.
async fn open_at(
    addr: &str,
    open: covet_protocol::api::SubscribeOpen,
) -> Result<u64, tonic::Status> {
    use covet_protocol::api::{subscribe_request, subscribe_response, SubscribeRequest};
    let first = SubscribeRequest {
        kind: Some(subscribe_request::Kind::Open(open)),
    };
    let mut stream = CovetClient::new(channel(addr).await)
        .subscribe(futures::stream::iter(vec![first]).chain(futures::stream::pending()))
        .await?
        .into_inner();
    let msg = tokio::time::timeout(STEP, stream.message())
        .await
        .expect("an answer in time")?;
    match msg.and_then(|m| m.kind) {
        Some(subscribe_response::Kind::Opened(o)) => Ok(o.offset),
        other => panic!("expected opened, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_numeric_field_at_its_extremes_is_answered_cleanly() {
    use covet_protocol::api::{position, Position, SubscribeOpen};
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), &[]);
    let mut raw_client = CovetClient::new(channel(&broker.addr).await);
    let create = |f: fn(&mut CreateTopicRequest)| {
        let mut req = CreateTopicRequest {
            name: "x".into(),
            ..Default::default()
        };
        f(&mut req);
        req
    };
    for req in [
        create(|r| r.partitions = u32::MAX),
        create(|r| r.replication_factor = u32::MAX),
        create(|r| r.max_batch_bytes = Some(u32::MAX)),
        create(|r| r.max_batch_bytes = Some(0)),
    ] {
        let status = raw_client.create_topic(req.clone()).await.unwrap_err();
        assert_eq!(reason_of(&status), Some(Reason::InvalidConfig), "{req:?}");
    }

    let client = Client::connect(&broker.addr).await.unwrap();
    client.create_topic(TopicSpec::new("t")).await.unwrap();
    // Request ids and partitions at their extremes.
    let messages = vec![
        ProduceRequest {
            request_id: u64::MAX,
            topic: "t".into(),
            partition: 0,
            batch: batch_of(2),
        },
        ProduceRequest {
            request_id: 0,
            topic: "t".into(),
            partition: u32::MAX,
            batch: batch_of(2),
        },
    ]
    .into_iter()
    .map(|r| Bytes::from(r.encode_to_vec()))
    .collect::<Vec<_>>();
    let mut responses = raw::stream::<ProduceResponse, _>(
        channel(&broker.addr).await,
        "/covet.v1.Covet/Produce",
        futures::stream::iter(messages),
    )
    .await
    .unwrap();
    let a = responses.message().await.unwrap().unwrap();
    assert_eq!((a.request_id, a.error, a.base_offset), (u64::MAX, None, 0));
    let b = responses.message().await.unwrap().unwrap();
    assert_eq!(b.request_id, 0);
    assert_eq!(b.error.unwrap().reason, "UNKNOWN_PARTITION");
    assert!(responses.message().await.unwrap().is_none());

    // Subscribe positions and credit at their extremes.
    let at = |kind| SubscribeOpen {
        topic: "t".into(),
        partition: 0,
        from: Some(Position { kind: Some(kind) }),
        credit: u64::MAX,
        allow_follower: false,
        group: None,
    };
    let status = open_at(&broker.addr, at(position::Kind::Offset(u64::MAX)))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status), Some(Reason::OffsetOutOfRange));
    assert_eq!(
        open_at(&broker.addr, at(position::Kind::TimestampMs(i64::MIN)))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        open_at(&broker.addr, at(position::Kind::TimestampMs(i64::MAX)))
            .await
            .unwrap(),
        2
    );
    let mut bad_partition = at(position::Kind::Offset(0));
    bad_partition.partition = u32::MAX;
    let status = open_at(&broker.addr, bad_partition).await.unwrap_err();
    assert_eq!(reason_of(&status), Some(Reason::UnknownPartition));
}
