//! The `covet.v1.Covet` gRPC service: a thin adapter that validates
//! requests, hands them to the Raft driver or the catalog, and converts
//! results. Errors become statuses only through `BrokerError::to_status`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;
use covet_protocol::api::covet_server::Covet;
use covet_protocol::api::*;
use covet_protocol::batch;
use covet_protocol::topic::validate_topic_name;
use futures::Stream;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{NodeHandle, APPLY_TIMEOUT};
use crate::error::{BrokerError, Result};
use crate::group::Applied;
use crate::state::meta::{allocate_producer_id_command, delete_topic_command, MetaEffect};
use crate::transport::Directory;

/// Default largest batch a topic accepts.
pub const DEFAULT_MAX_BATCH_BYTES: u32 = 8 << 20;
/// Largest `max_batch_bytes` a topic may set; the gRPC message limit is
/// derived from it.
pub const MAX_MAX_BATCH_BYTES: u32 = 64 << 20;
/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 4096;
/// Produce requests of one stream proposed but not yet answered. Beyond it
/// the broker stops reading the stream and HTTP/2 flow control pushes back.
const MAX_IN_FLIGHT_PER_STREAM: usize = 1024;
/// Bytes of produce requests the node holds at once, over all streams:
/// the bound on the broker's memory under produce load.
const PRODUCE_MEMORY_BYTES: u32 = 256 << 20;
/// Bytes of produce requests one stream holds, received and not yet
/// answered to the client. A stream whose client does not read its
/// responses stops being read when this is spent, so it can never pin more
/// than this much of the node's budget. A larger request counts as this
/// much, so any request the message limit lets through still fits.
const PRODUCE_STREAM_BYTES: u32 = 32 << 20;
/// Bytes of produce requests one connection holds over all its streams:
/// a client cannot take the node's budget by opening many streams. With
/// the node's budget four times as large, three such clients leave every
/// other client room.
const PRODUCE_CONNECTION_BYTES: u32 = 64 << 20;

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct CovetService {
    node: NodeHandle,
    produce_memory: Arc<Semaphore>,
    /// The produce budget of each client connection (by peer address),
    /// alive while one of its streams is.
    connection_memory: Arc<ConnectionBudgets>,
    address: SocketAddr,
    /// Every node of the cluster, and the client addresses peers announced.
    cluster_nodes: Arc<Vec<u64>>,
    directory: Arc<Directory>,
    shutdown: watch::Receiver<bool>,
    /// Consumer groups' cursors on the partitions this node leads.
    group_sessions: Arc<crate::consumer::session::GroupSessions>,
    /// Consumer group membership, served while this node leads the
    /// metadata group.
    coordinator: Arc<crate::consumer::coordinator::Coordinator>,
}

impl CovetService {
    pub fn new(
        node: NodeHandle,
        address: SocketAddr,
        cluster_nodes: Vec<u64>,
        directory: Arc<Directory>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let coordinator = Arc::new(crate::consumer::coordinator::Coordinator::new(node.clone()));
        Arc::clone(&coordinator).spawn_expiry(shutdown.clone());
        CovetService {
            coordinator,
            node,
            produce_memory: Arc::new(Semaphore::new(PRODUCE_MEMORY_BYTES as usize)),
            connection_memory: Arc::default(),
            address,
            cluster_nodes: Arc::new(cluster_nodes),
            directory,
            shutdown,
            group_sessions: Arc::new(crate::consumer::session::GroupSessions::new(
                address.to_string(),
            )),
        }
    }

    /// Checks a produce request and returns the partition's Raft group and
    /// the batch to propose.
    #[tracing::instrument(level = "debug", skip_all, fields(topic = %req.topic, partition = req.partition, bytes = req.batch.len()))]
    fn validate_produce(&self, req: &ProduceRequest) -> Result<(u64, Bytes)> {
        let topic = self.node.catalog.topic(&req.topic)?;
        let partition = topic.partition(req.partition)?;
        partition.local()?;
        let limit = topic.config().max_batch_bytes as usize;
        if req.batch.len() > limit {
            return Err(BrokerError::BatchTooLarge {
                size: req.batch.len(),
                limit,
            });
        }
        let batch = ignore_base_offset(&req.batch);
        batch::validate(&batch).map_err(|e| BrokerError::CorruptBatch(e.to_string()))?;
        Ok((partition.group, batch))
    }

    /// Validates and submits one produce request; the receiver (if any)
    /// yields its outcome once applied.
    async fn submit(&self, req: &ProduceRequest) -> Result<oneshot::Receiver<Result<Applied>>> {
        let (group, batch) = self.validate_produce(req)?;
        // Only ids the metadata group handed out (waiting briefly for this
        // node's metadata to catch up with a just-allocated one).
        self.node
            .catalog
            .check_producer(&batch, crate::catalog::PRODUCER_ID_WAIT)
            .await?;
        self.node.submit_batch(&req.topic, group, batch).await
    }

    fn topic_config(req: &CreateTopicRequest) -> Result<TopicConfig> {
        validate_topic_name(&req.name).map_err(|e| BrokerError::InvalidTopicName(e.to_string()))?;
        let partitions = if req.partitions == 0 {
            1
        } else {
            req.partitions
        };
        if partitions > MAX_PARTITIONS {
            return Err(BrokerError::InvalidConfig(format!(
                "{partitions} partitions requested, the limit is {MAX_PARTITIONS}"
            )));
        }
        let max_batch_bytes = req.max_batch_bytes.unwrap_or(DEFAULT_MAX_BATCH_BYTES);
        if !(batch::HEADER_LEN as u32..=MAX_MAX_BATCH_BYTES).contains(&max_batch_bytes) {
            return Err(BrokerError::InvalidConfig(format!(
                "max batch bytes must be between {} and {MAX_MAX_BATCH_BYTES}",
                batch::HEADER_LEN
            )));
        }
        // Protobuf encodes int64 and uint64 alike, so a client that thinks
        // of retention as signed sends -1 as 2^64 - 1: refuse what would be
        // negative as a signed value rather than read it as "forever".
        for (field, value) in [
            ("retention_ms", req.retention_ms),
            ("retention_bytes", req.retention_bytes),
        ] {
            if let Some(v) = value.filter(|&v| i64::try_from(v).is_err()) {
                return Err(BrokerError::InvalidConfig(format!(
                    "{field} must not be negative: {v} is {} as a signed 64-bit value; use 0 for no limit",
                    v as i64
                )));
            }
        }
        Ok(TopicConfig {
            partitions,
            replication_factor: req.replication_factor,
            retention_ms: req.retention_ms.unwrap_or(0),
            retention_bytes: req.retention_bytes.unwrap_or(0),
            max_batch_bytes,
        })
    }

    /// The cluster's nodes with the client addresses known here.
    fn nodes(&self) -> Vec<NodeInfo> {
        let me = self.node.node_id;
        self.cluster_nodes
            .iter()
            .map(|&id| NodeInfo {
                id,
                address: if id == me {
                    self.address.to_string()
                } else {
                    self.directory.get(id).unwrap_or_default()
                },
            })
            .collect()
    }

    /// The metadata leader and its term, (0, 0) if unknown.
    fn controller(&self) -> (u64, u64) {
        self.node.catalog.meta_leader()
    }

    /// Waits until the catalog shows the topic `name` present (or absent).
    async fn await_catalog(&self, name: &str, present: bool) -> Result<()> {
        let mut changes = self.node.catalog.changes();
        let wait = async {
            while self.node.catalog.topic(name).is_ok() != present {
                if changes.changed().await.is_err() {
                    return Err(BrokerError::ShuttingDown);
                }
            }
            Ok(())
        };
        tokio::time::timeout(APPLY_TIMEOUT, wait)
            .await
            .map_err(|_| BrokerError::Timeout("waiting for the topic to open".into()))?
    }
}

/// The batch with its base offset field zeroed. The leader stamps the real
/// offset at propose time, so what the client put there means nothing; it
/// must not make validation fail either (a base offset near `u64::MAX`
/// would overflow the batch's offsets). The copy is made only for a client
/// that sent a non-zero value: every Covet client sends 0.
fn ignore_base_offset(sent: &Bytes) -> Bytes {
    match batch::read_header(sent) {
        Ok(h) if h.base_offset != 0 => {
            let mut copy = sent.to_vec();
            batch::stamp_base_offset(&mut copy, 0);
            Bytes::from(copy)
        }
        _ => sent.clone(),
    }
}

fn produce_response(id: u64, partition: u32, outcome: Result<Applied>) -> ProduceResponse {
    match outcome {
        Ok(Applied::Batch {
            base_offset,
            record_count,
        }) => ProduceResponse {
            request_id: id,
            partition,
            base_offset,
            record_count,
            error: None,
        },
        Ok(_) => produce_response(
            id,
            partition,
            Err(BrokerError::Internal("wrong outcome".into())),
        ),
        Err(e) => ProduceResponse {
            request_id: id,
            partition,
            base_offset: 0,
            record_count: 0,
            error: Some(e.to_api()),
        },
    }
}

/// A submitted request awaiting its answer, holding its share of the
/// broker's produce memory until then.
struct Pending {
    id: u64,
    partition: u32,
    submitted: Result<oneshot::Receiver<Result<Applied>>>,
    /// Its share of the node's budget, given back once its outcome is
    /// known: the batch is in the log by then (or refused).
    node: OwnedSemaphorePermit,
    /// Its share of its stream's and connection's budgets, given back once
    /// its answer is handed to the client's stream.
    _stream: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// Produce budgets of the client connections, by peer address. An entry
/// lives while a stream of that connection holds its semaphore; dead ones
/// are dropped as new connections arrive, so the map grows only with the
/// number of live connections.
#[derive(Default)]
struct ConnectionBudgets(std::sync::Mutex<HashMap<SocketAddr, Weak<Semaphore>>>);

impl ConnectionBudgets {
    /// The budget of the connection from `peer`; a stream whose peer is
    /// unknown gets a budget of its own.
    fn of(&self, peer: Option<SocketAddr>) -> Arc<Semaphore> {
        let fresh = || Arc::new(Semaphore::new(PRODUCE_CONNECTION_BYTES as usize));
        let Some(peer) = peer else { return fresh() };
        // A poisoned lock only means another stream panicked mid-insert;
        // the map is still a valid cache.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = map.get(&peer).and_then(Weak::upgrade) {
            return budget;
        }
        map.retain(|_, b| b.strong_count() > 0);
        let budget = fresh();
        map.insert(peer, Arc::downgrade(&budget));
        budget
    }
}

/// Takes a request's share of its stream's, its connection's and the
/// node's produce budgets, in that order (always the same order, so two
/// streams never wait on each other crosswise); `None` once the node
/// closes its budget.
async fn reserve(
    size: usize,
    stream: &Arc<Semaphore>,
    connection: &Arc<Semaphore>,
    node: &Arc<Semaphore>,
) -> Option<(
    OwnedSemaphorePermit,
    (OwnedSemaphorePermit, OwnedSemaphorePermit),
)> {
    let size = u32::try_from(size).unwrap_or(u32::MAX).max(1);
    let local = size.min(PRODUCE_STREAM_BYTES);
    let s = stream.clone().acquire_many_owned(local).await.ok()?;
    let c = connection.clone().acquire_many_owned(local).await.ok()?;
    let n = node
        .clone()
        .acquire_many_owned(size.min(PRODUCE_MEMORY_BYTES))
        .await
        .ok()?;
    Some((n, (s, c)))
}

/// What the reader of a produce stream hands its writer, in stream order.
enum Step {
    /// A request to answer once its outcome is known.
    Answer(Pending),
    /// The stream broke; answer the requests before it, then fail the call.
    Fail(BrokerError),
}

#[tonic::async_trait]
impl Covet for CovetService {
    async fn metadata(
        &self,
        request: Request<MetadataRequest>,
    ) -> std::result::Result<Response<MetadataResponse>, Status> {
        let wanted = request.into_inner().topics;
        let topics = if wanted.is_empty() {
            self.node
                .catalog
                .topics()
                .iter()
                .map(|t| t.info())
                .collect()
        } else {
            wanted
                .iter()
                .map(|n| self.node.catalog.topic(n).map(|t| t.info()))
                .collect::<Result<_>>()?
        };
        let nodes = self.nodes();
        let (controller, controller_term) = self.controller();
        Ok(Response::new(MetadataResponse {
            nodes,
            topics,
            controller,
            controller_term,
            node_id: self.node.node_id,
        }))
    }

    type ProduceStream = BoxStream<ProduceResponse>;

    async fn produce(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> std::result::Result<Response<Self::ProduceStream>, Status> {
        let connection = self.connection_memory.of(request.remote_addr());
        let stream = Arc::new(Semaphore::new(PRODUCE_STREAM_BYTES as usize));
        let mut inbound = request.into_inner();
        let (pending_tx, mut pending_rx) = mpsc::channel::<Step>(MAX_IN_FLIGHT_PER_STREAM);
        let (out_tx, out_rx) = mpsc::channel(64);
        let svc = self.clone();
        // Reader: submits requests in stream order, so batches of one
        // partition are proposed in the order the client sent them.
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                // On shutdown the reader stops taking requests; the writer
                // answers what was taken and ends the stream, so clients
                // move to another node instead of holding this one open.
                let msg = tokio::select! {
                    msg = inbound.message() => msg,
                    _ = shutdown.wait_for(|s| *s) => break,
                };
                let req = match msg {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    // An undecodable or oversized message ends the stream:
                    // the writer answers what came before it, then fails
                    // the call with the reason, so the client never
                    // mistakes the end for success.
                    Err(status) => {
                        let failure = Step::Fail(BrokerError::from_inbound(&status));
                        let _ = pending_tx.send(failure).await;
                        break;
                    }
                };
                // Batches received and not yet answered count against
                // their stream's, their connection's and the node's
                // budgets; when one is spent the reader stops reading and
                // HTTP/2 flow control holds the client back. A client that
                // never reads its answers stalls only itself.
                let Some((node, local)) =
                    reserve(req.batch.len(), &stream, &connection, &svc.produce_memory).await
                else {
                    break;
                };
                let pending = Pending {
                    id: req.request_id,
                    partition: req.partition,
                    submitted: svc.submit(&req).await,
                    node,
                    _stream: local,
                };
                if pending_tx.send(Step::Answer(pending)).await.is_err() {
                    break;
                }
            }
        });
        // Writer: answers in the same order, as each entry is applied.
        tokio::spawn(async move {
            while let Some(step) = pending_rx.recv().await {
                let Pending {
                    id,
                    partition,
                    submitted,
                    node,
                    _stream,
                } = match step {
                    Step::Answer(pending) => pending,
                    Step::Fail(e) => {
                        let _ = out_tx.send(Err(e.to_status())).await;
                        break;
                    }
                };
                let outcome = match submitted {
                    Ok(rx) => match tokio::time::timeout(APPLY_TIMEOUT, rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(BrokerError::ShuttingDown),
                        Err(_) => Err(BrokerError::Timeout("waiting for commit".into())),
                    },
                    Err(e) => Err(e),
                };
                drop(node);
                if out_tx
                    .send(Ok(produce_response(id, partition, outcome)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> std::result::Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|s| BrokerError::from_inbound(&s))?;
        let open = match first {
            Some(SubscribeRequest {
                kind: Some(subscribe_request::Kind::Open(open)),
            }) => open,
            _ => {
                return Err(BrokerError::InvalidRequest(
                    "the first subscribe message must be `open`".into(),
                )
                .into())
            }
        };
        let topic = self.node.catalog.topic(&open.topic)?;
        let partition = topic.partition(open.partition)?.clone();
        if let Some(group) = &open.group {
            let session = crate::consumer::session::Session::open(
                &self.group_sessions,
                self.node.clone(),
                &open.topic,
                &partition,
                group,
                inbound,
                self.shutdown.clone(),
            )
            .await?;
            return Ok(Response::new(Box::pin(session.spawn())));
        }
        let session = crate::subscribe::Session::open(
            &partition,
            self.node.node_id,
            &open,
            inbound,
            self.shutdown.clone(),
        )
        .await?;
        Ok(Response::new(Box::pin(session.spawn())))
    }

    async fn join_group(
        &self,
        request: Request<JoinGroupRequest>,
    ) -> std::result::Result<Response<MemberAssignment>, Status> {
        Ok(Response::new(
            self.coordinator.join(request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<MemberAssignment>, Status> {
        Ok(Response::new(
            self.coordinator.heartbeat(request.into_inner()).await?,
        ))
    }

    async fn leave_group(
        &self,
        request: Request<LeaveGroupRequest>,
    ) -> std::result::Result<Response<LeaveGroupResponse>, Status> {
        self.coordinator.leave(request.into_inner()).await?;
        Ok(Response::new(LeaveGroupResponse {}))
    }

    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> std::result::Result<Response<ListGroupsResponse>, Status> {
        let groups = crate::consumer::admin::list(&self.node.catalog);
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<DescribeGroupRequest>,
    ) -> std::result::Result<Response<DescribeGroupResponse>, Status> {
        let group = request.into_inner().group;
        // Until then this node's applied state may be older than what it
        // described before a restart (committed offsets would seem to move
        // back): another node answers instead.
        if !*self.node.ready.borrow() {
            return Err(BrokerError::NotReady(
                "its applied state has not caught up yet; ask another node".into(),
            )
            .to_status());
        }
        Ok(Response::new(crate::consumer::admin::describe(
            &self.node.catalog,
            &group,
        )?))
    }

    async fn reset_group(
        &self,
        request: Request<ResetGroupRequest>,
    ) -> std::result::Result<Response<GroupPartition>, Status> {
        let req = request.into_inner();
        let topic = self.node.catalog.topic(&req.topic)?;
        let partition = topic.partition(req.partition)?.clone();
        let view = crate::consumer::admin::reset(
            &self.group_sessions,
            &self.node,
            &req.topic,
            &partition,
            &req.group,
            req.to.as_ref(),
            req.force,
        )
        .await?;
        Ok(Response::new(view))
    }

    async fn delete_group(
        &self,
        request: Request<DeleteGroupRequest>,
    ) -> std::result::Result<Response<DeleteGroupResponse>, Status> {
        let req = request.into_inner();
        let topic = self.node.catalog.topic(&req.topic)?;
        let partition = topic.partition(req.partition)?.clone();
        crate::consumer::admin::delete(
            &self.group_sessions,
            &self.node,
            &partition,
            &req.group,
            req.force,
        )
        .await?;
        Ok(Response::new(DeleteGroupResponse {}))
    }

    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> std::result::Result<Response<TopicInfo>, Status> {
        let req = request.into_inner();
        let config = Self::topic_config(&req)?;
        if self.node.catalog.topic(&req.name).is_ok() {
            return Err(BrokerError::TopicExists(req.name).into());
        }
        self.node.create_topic(req.name.clone(), config).await?;
        self.await_catalog(&req.name, true).await?;
        Ok(Response::new(self.node.catalog.topic(&req.name)?.info()))
    }

    async fn delete_topic(
        &self,
        request: Request<DeleteTopicRequest>,
    ) -> std::result::Result<Response<DeleteTopicResponse>, Status> {
        let name = request.into_inner().name;
        self.node.catalog.topic(&name)?;
        self.node.meta(delete_topic_command(name.clone())).await?;
        self.await_catalog(&name, false).await?;
        Ok(Response::new(DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _: Request<ListTopicsRequest>,
    ) -> std::result::Result<Response<ListTopicsResponse>, Status> {
        let topics = self
            .node
            .catalog
            .topics()
            .iter()
            .map(|t| t.info())
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<DescribeTopicRequest>,
    ) -> std::result::Result<Response<TopicInfo>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(self.node.catalog.topic(&name)?.info()))
    }

    async fn init_producer(
        &self,
        _: Request<InitProducerRequest>,
    ) -> std::result::Result<Response<InitProducerResponse>, Status> {
        match self.node.meta(allocate_producer_id_command()).await? {
            MetaEffect::ProducerId(producer_id) => {
                Ok(Response::new(InitProducerResponse { producer_id }))
            }
            _ => Err(BrokerError::Internal("unexpected metadata outcome".into()).into()),
        }
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> std::result::Result<Response<ChangeMembershipResponse>, Status> {
        let req = request.into_inner();
        let (add, node) = match (req.add_node, req.remove_node) {
            (n, 0) if n != 0 => (true, n),
            (0, n) if n != 0 => (false, n),
            _ => {
                return Err(BrokerError::InvalidRequest(
                    "give exactly one of add_node and remove_node".into(),
                )
                .into())
            }
        };
        if add && !self.cluster_nodes.contains(&node) {
            return Err(BrokerError::InvalidRequest(format!(
                "node {node} is not in this node's --peers; its address is unknown"
            ))
            .into());
        }
        if add {
            crate::membership::check_can_add(&self.node, &self.directory, node).await?;
        }
        let voters = self.node.change_membership(add, node).await?;
        Ok(Response::new(ChangeMembershipResponse { voters }))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> std::result::Result<Response<ClusterStatusResponse>, Status> {
        let groups = self.node.status().await?;
        let nodes = self.nodes();
        Ok(Response::new(ClusterStatusResponse {
            node_id: self.node.node_id,
            nodes,
            groups,
        }))
    }
}
