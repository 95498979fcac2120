//! The producer against a scripted two-node cluster (in-process gRPC
//! servers on loopback, no real broker): issue 6's first scenario, a new
//! producer's first batches for one partition routed to two leaders.
//!
//! Node 1 leads partition 0 when the producer sends its first batch; it
//! takes the batch, is deposed (the metadata now names node 2, in a newer
//! term), and answers only when the test lets it: `NOT_LEADER`. Node 2
//! stores batches by the broker's sequence rules for one producer in epoch
//! 0 (the next sequence only; a repeat of a stored one is answered with its
//! offset; anything else `OUT_OF_ORDER_SEQUENCE`) and records the order in
//! which it received sequence numbers.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::covet_client::{Client, ProducerConfig, Reason, Record};
use bytes::Bytes;
use covet_protocol::api::covet_server::{Covet, CovetServer};
use covet_protocol::api::{
    ChangeMembershipRequest, ChangeMembershipResponse, ClusterStatusRequest, ClusterStatusResponse,
    CreateTopicRequest, DeleteGroupRequest, DeleteGroupResponse, DeleteTopicRequest,
    DeleteTopicResponse, DescribeGroupRequest, DescribeGroupResponse, DescribeTopicRequest,
    GroupPartition, HeartbeatRequest, InitProducerRequest, InitProducerResponse, JoinGroupRequest,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse,
    ListTopicsRequest, ListTopicsResponse, MemberAssignment, MetadataRequest, MetadataResponse,
    NodeInfo, PartitionInfo, ProduceRequest, ProduceResponse, ResetGroupRequest, SubscribeRequest,
    SubscribeResponse, TopicConfig, TopicInfo,
};
use covet_protocol::batch;
use tokio::sync::Notify;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct State {
    addresses: Vec<(u64, String)>,
    /// Leader of partition 0 and its term.
    leader: (u64, u64),
    /// Sequence numbers node 1 received.
    node1_got: Vec<i32>,
    /// Sequence numbers node 2 received, in order.
    node2_got: Vec<i32>,
    /// Node 2's store: base sequence and record count of each batch, in
    /// offset order.
    stored: Vec<(i32, u32)>,
}

struct Cluster {
    state: Mutex<State>,
    /// Lets node 1 answer the batch it holds.
    release: Notify,
    /// Node 1 took a batch.
    held: Notify,
}

struct Node {
    id: u64,
    cluster: Arc<Cluster>,
}

fn error(reason: Reason, leader_hint: u64) -> Option<covet_protocol::api::Error> {
    Some(covet_protocol::api::Error {
        reason: reason.as_str().into(),
        message: "scripted".into(),
        leader_hint,
    })
}

impl Cluster {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn topic(&self) -> TopicInfo {
        let (leader, leader_term) = self.lock().leader;
        TopicInfo {
            name: "t".into(),
            config: Some(TopicConfig {
                partitions: 1,
                replication_factor: 2,
                max_batch_bytes: 1 << 20,
                ..Default::default()
            }),
            partitions: vec![PartitionInfo {
                partition: 0,
                leader,
                replicas: vec![1, 2],
                leader_term,
                ..Default::default()
            }],
        }
    }

    /// Node 2 as partition leader: the sequence rules for epoch 0.
    fn store(&self, req: &ProduceRequest) -> ProduceResponse {
        let h = batch::read_header(&req.batch).unwrap();
        let mut s = self.lock();
        s.node2_got.push(h.base_sequence);
        let mut answer = ProduceResponse {
            request_id: req.request_id,
            partition: 0,
            record_count: h.record_count,
            ..Default::default()
        };
        let mut offset = 0u64;
        let mut next = 0i32;
        for &(seq, count) in &s.stored {
            if seq == h.base_sequence {
                answer.base_offset = offset;
                return answer;
            }
            offset += u64::from(count);
            next = seq + count as i32;
        }
        if h.base_sequence == next {
            s.stored.push((h.base_sequence, h.record_count));
            answer.base_offset = offset;
        } else {
            answer.error = error(Reason::OutOfOrderSequence, 0);
        }
        answer
    }

    /// Node 1: takes the batch, is deposed, answers NOT_LEADER when
    /// released.
    async fn deposed(&self, req: &ProduceRequest) -> ProduceResponse {
        {
            let mut s = self.lock();
            let h = batch::read_header(&req.batch).unwrap();
            s.node1_got.push(h.base_sequence);
            s.leader = (2, 2);
        }
        self.held.notify_one();
        self.release.notified().await;
        ProduceResponse {
            request_id: req.request_id,
            partition: 0,
            error: error(Reason::NotLeader, 2),
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl Covet for Node {
    async fn metadata(
        &self,
        _: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        let nodes = self
            .cluster
            .lock()
            .addresses
            .iter()
            .map(|(id, address)| NodeInfo {
                id: *id,
                address: address.clone(),
            })
            .collect();
        Ok(Response::new(MetadataResponse {
            nodes,
            topics: vec![self.cluster.topic()],
            controller: 1,
            node_id: self.id,
            controller_term: 1,
        }))
    }

    type ProduceStream = BoxStream<ProduceResponse>;

    async fn produce(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (id, cluster) = (self.id, self.cluster.clone());
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                let answer = if id == 2 {
                    cluster.store(&req)
                } else {
                    cluster.deposed(&req).await
                };
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn subscribe(
        &self,
        _: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("scripted"))
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
        Ok(Response::new(self.cluster.topic()))
    }

    async fn init_producer(
        &self,
        _: Request<InitProducerRequest>,
    ) -> Result<Response<InitProducerResponse>, Status> {
        Ok(Response::new(InitProducerResponse { producer_id: 0 }))
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

async fn start_cluster() -> Arc<Cluster> {
    let cluster = Arc::new(Cluster {
        state: Mutex::new(State {
            leader: (1, 1),
            ..Default::default()
        }),
        release: Notify::new(),
        held: Notify::new(),
    });
    for id in [1, 2] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        cluster.lock().addresses.push((id, addr));
        let node = Node {
            id,
            cluster: cluster.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CovetServer::new(node))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
    }
    cluster
}

fn record(v: &str) -> Record {
    Record {
        value: Bytes::from(v.to_string()),
        timestamp_ms: 1,
        ..Default::default()
    }
}

/// The second batch must not go to the new leader while the first is still
/// out on the deposed one: there it would overtake it (and, under the old
/// broker rule that took a producer's first batch at any sequence, be
/// stored ahead of it and leave it failing as out of order). Both are
/// stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_batches_routed_to_two_leaders_are_stored_in_order() {
    let cluster = start_cluster().await;
    let seed = cluster.lock().addresses[0].1.clone();
    let client = Client::connect(&seed).await.unwrap();
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    });

    let first = producer.send_to("t", 0, record("a")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), cluster.held.notified())
        .await
        .expect("node 1 takes the first batch");
    // The client learns that node 2 leads now, while the first batch is
    // still unanswered on node 1's stream.
    let meta = client.metadata().await.unwrap();
    assert_eq!(meta.topics[0].partitions[0].leader, 2);
    let second = producer.send_to("t", 0, record("b")).await.unwrap();
    // Give a wrong sender every chance to send the second batch to node 2
    // now: wait until the producer has had time to route it (its metadata
    // already names node 2), then check node 2 got nothing yet.
    let flushed = tokio::time::timeout(Duration::from_millis(300), producer.flush()).await;
    assert!(flushed.is_err(), "nothing can be acknowledged yet");
    let early = cluster.lock().node2_got.clone();
    assert_eq!(
        early,
        Vec::<i32>::new(),
        "no batch goes to node 2 while one is out on node 1"
    );

    cluster.release.notify_one();
    let (a, b) = tokio::time::timeout(Duration::from_secs(20), async {
        (first.await, second.await)
    })
    .await
    .expect("both batches are answered");
    assert_eq!(a.unwrap().offset, 0);
    assert_eq!(b.unwrap().offset, 1);
    let (node1_got, node2_got, stored) = {
        let s = cluster.lock();
        (s.node1_got.clone(), s.node2_got.clone(), s.stored.clone())
    };
    assert_eq!(node1_got, vec![0]);
    assert_eq!(stored, vec![(0, 1), (1, 1)], "stored once each, in order");
    assert_eq!(node2_got.first(), Some(&0), "the first batch went first");
}
