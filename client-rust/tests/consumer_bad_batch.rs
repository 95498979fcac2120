//! `Subscription::next` against a scripted broker (an in-process gRPC
//! server on loopback, no real broker) that sends bad batches inside
//! coalesced messages: the records before the fault are delivered, then
//! one error, then the partition's stream ends. Never a panic.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::covet_client::{Client, Error, Record, StartPosition, SubscriptionOptions};
use bytes::Bytes;
use covet_protocol::api::covet_server::{Covet, CovetServer};
use covet_protocol::api::{
    subscribe_response, Batches, ChangeMembershipRequest, ChangeMembershipResponse,
    ClusterStatusRequest, ClusterStatusResponse, CreateTopicRequest, DeleteGroupRequest,
    DeleteGroupResponse, DeleteTopicRequest, DeleteTopicResponse, DescribeGroupRequest,
    DescribeGroupResponse, DescribeTopicRequest, GroupPartition, HeartbeatRequest,
    InitProducerRequest, InitProducerResponse, JoinGroupRequest, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse, ListTopicsRequest,
    ListTopicsResponse, MemberAssignment, MetadataRequest, MetadataResponse, NodeInfo, Opened,
    PartitionInfo, ProduceRequest, ProduceResponse, ResetGroupRequest, SubscribeRequest,
    SubscribeResponse, TopicConfig, TopicInfo,
};
use covet_protocol::batch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Bounds every step of these tests.
const STEP: Duration = Duration::from_secs(20);

/// A one-node cluster whose partition 0 of topic `t` answers every
/// subscription with `Opened` at offset 0, then `script`, then silence.
struct Scripted {
    address: String,
    script: Vec<Vec<Bytes>>,
    subscriptions: Mutex<u32>,
}

fn topic() -> TopicInfo {
    TopicInfo {
        name: "t".into(),
        config: Some(TopicConfig {
            partitions: 1,
            replication_factor: 1,
            max_batch_bytes: 1 << 20,
            ..Default::default()
        }),
        partitions: vec![PartitionInfo {
            partition: 0,
            leader: 1,
            replicas: vec![1],
            leader_term: 1,
            ..Default::default()
        }],
    }
}

#[tonic::async_trait]
impl Covet for Scripted {
    async fn metadata(
        &self,
        _: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        Ok(Response::new(MetadataResponse {
            nodes: vec![NodeInfo {
                id: 1,
                address: self.address.clone(),
            }],
            topics: vec![topic()],
            controller: 1,
            node_id: 1,
            controller_term: 1,
        }))
    }

    type ProduceStream = BoxStream<ProduceResponse>;

    async fn produce(
        &self,
        _: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStream>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn subscribe(
        &self,
        _: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        *self.subscriptions.lock().unwrap() += 1;
        let opened = SubscribeResponse {
            kind: Some(subscribe_response::Kind::Opened(Opened {
                partition: 0,
                offset: 0,
                start_offset: 0,
                high_watermark: 100,
            })),
        };
        let messages = self.script.iter().map(|batches| SubscribeResponse {
            kind: Some(subscribe_response::Kind::Batches(Batches {
                batches: batches.clone(),
                high_watermark: 100,
            })),
        });
        let all: Vec<_> = std::iter::once(opened).chain(messages).map(Ok).collect();
        let stream =
            tokio_stream::StreamExt::chain(tokio_stream::iter(all), futures::stream::pending());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn create_topic(
        &self,
        _: Request<CreateTopicRequest>,
    ) -> Result<Response<TopicInfo>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn delete_topic(
        &self,
        _: Request<DeleteTopicRequest>,
    ) -> Result<Response<DeleteTopicResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn list_topics(
        &self,
        _: Request<ListTopicsRequest>,
    ) -> Result<Response<ListTopicsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn describe_topic(
        &self,
        _: Request<DescribeTopicRequest>,
    ) -> Result<Response<TopicInfo>, Status> {
        Ok(Response::new(topic()))
    }

    async fn init_producer(
        &self,
        _: Request<InitProducerRequest>,
    ) -> Result<Response<InitProducerResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn change_membership(
        &self,
        _: Request<ChangeMembershipRequest>,
    ) -> Result<Response<ChangeMembershipResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn join_group(
        &self,
        _: Request<JoinGroupRequest>,
    ) -> Result<Response<MemberAssignment>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<MemberAssignment>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn leave_group(
        &self,
        _: Request<LeaveGroupRequest>,
    ) -> Result<Response<LeaveGroupResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn describe_group(
        &self,
        _: Request<DescribeGroupRequest>,
    ) -> Result<Response<DescribeGroupResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn reset_group(
        &self,
        _: Request<ResetGroupRequest>,
    ) -> Result<Response<GroupPartition>, Status> {
        Err(Status::unimplemented("scripted"))
    }

    async fn delete_group(
        &self,
        _: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        Err(Status::unimplemented("scripted"))
    }
}

async fn serve(script: Vec<Vec<Bytes>>) -> Arc<Scripted> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scripted = Arc::new(Scripted {
        address: listener.local_addr().unwrap().to_string(),
        script,
        subscriptions: Mutex::new(0),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CovetServer::from_arc(scripted.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    scripted
}

/// A batch at `base` whose records have one-byte values from `values`.
fn batch_at(base: u64, values: &str) -> Bytes {
    let records: Vec<Record> = values
        .bytes()
        .map(|v| Record {
            value: Bytes::copy_from_slice(&[v]),
            timestamp_ms: 1,
            ..Default::default()
        })
        .collect();
    let mut buf = batch::encode(&records).unwrap().to_vec();
    batch::stamp_base_offset(&mut buf, base);
    Bytes::from(buf)
}

/// [`batch_at`] with two records whose second breaks a record rule (its
/// offset delta), with a CRC that matches: what a broken broker, not a
/// broken wire, would send.
fn broken_at(base: u64) -> Bytes {
    let mut buf = batch_at(base, "xy").to_vec();
    // Record 0 is 8 bytes (length, attributes, timestamp delta, offset
    // delta, key length, value length, value, header count); record 1's
    // offset delta is its fourth byte.
    let at = batch::HEADER_LEN + 8 + 3;
    assert_eq!(buf[at], 1);
    buf[at] = 5;
    // Rewriting the epoch recomputes the CRC over the edited records.
    let resealed = batch::with_producer_epoch(&buf, -1).unwrap();
    assert!(batch::BatchRecords::new(resealed.clone()).is_ok());
    resealed
}

/// The values, then the error, `Subscription::next` yields before it ends.
async fn read_all(scripted: &Scripted) -> (Vec<(u64, u8)>, Vec<Error>) {
    let client = Client::connect(&scripted.address).await.unwrap();
    let mut sub = client
        .subscribe(SubscriptionOptions::new("t", StartPosition::Earliest))
        .await
        .unwrap();
    let (mut records, mut errors) = (Vec::new(), Vec::new());
    while let Some(item) = tokio::time::timeout(STEP, sub.next())
        .await
        .expect("the subscription ends in time")
    {
        match item {
            Ok(r) => records.push((r.offset, r.value[0])),
            Err(e) => errors.push(e),
        }
    }
    (records, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_broken_record_is_an_error_after_the_records_before_it() {
    let scripted = serve(vec![
        vec![batch_at(0, "ab"), broken_at(2)],
        vec![batch_at(4, "c")],
    ])
    .await;
    let (records, errors) = read_all(&scripted).await;
    // The broken batch's first record is sound and is delivered: records
    // are decoded as they are taken.
    assert_eq!(records, vec![(0, b'a'), (1, b'b'), (2, b'x')]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(&errors[0], Error::Protocol(m) if m.contains("record offset delta")),
        "{errors:?}"
    );
    // Not retried: the broker's bytes, not the connection, are at fault.
    assert_eq!(*scripted.subscriptions.lock().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_bad_crc_is_an_error_before_any_of_its_records() {
    let mut corrupt = batch_at(2, "xy").to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let scripted = serve(vec![
        vec![batch_at(0, "ab"), Bytes::from(corrupt), batch_at(4, "c")],
        vec![batch_at(5, "d")],
    ])
    .await;
    let (records, errors) = read_all(&scripted).await;
    assert_eq!(records, vec![(0, b'a'), (1, b'b')]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(&errors[0], Error::Protocol(m) if m.contains("CRC")),
        "{errors:?}"
    );
    assert_eq!(*scripted.subscriptions.lock().unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_several_messages_come_out_in_order() {
    let scripted = serve(vec![
        vec![batch_at(0, "ab"), batch_at(2, "c")],
        vec![batch_at(3, "de")],
    ])
    .await;
    let client = Client::connect(&scripted.address).await.unwrap();
    let mut sub = client
        .subscribe(SubscriptionOptions::new("t", StartPosition::Earliest))
        .await
        .unwrap();
    for (want, value) in (0..5).zip(b"abcde") {
        let r = tokio::time::timeout(STEP, sub.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("valid");
        assert_eq!((r.offset, r.value[0], r.partition), (want, *value, 0));
        assert_eq!(&*r.topic, "t");
    }
    let mut stream = client
        .open_partition("t", 0, StartPosition::Earliest, 10)
        .await
        .unwrap();
    let mut batches = Vec::new();
    while stream.position() < 5 {
        let b = tokio::time::timeout(STEP, stream.next_batch())
            .await
            .expect("in time")
            .expect("valid")
            .expect("open");
        batches.push(b.iter().map(|r| r.offset).collect::<Vec<_>>());
    }
    // One batch per call, as stored, even when a message carries several.
    assert_eq!(batches, vec![vec![0, 1], vec![2], vec![3, 4]]);
}
