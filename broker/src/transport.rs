//! The Raft transport between nodes.
//!
//! Every node keeps one long-lived gRPC stream to each peer (the
//! `RaftTransport.Send` call it dials) and sends batches of raft-rs
//! messages on it, each encoded with raft-rs's own protobuf codec and
//! tagged with its group. Messages for a peer wait in a queue bounded in
//! messages and in bytes of entry data (64 MiB): when
//! the peer is slow or gone the queue fills and further messages are
//! dropped, which Raft tolerates (it retries by its own timers), so a dead
//! peer never makes this node's memory grow. A broken stream is redialed
//! with exponential backoff.
//!
//! The receiving side hands decoded messages to the Raft driver over its
//! own channel, ahead of client requests, so heartbeats are not stuck
//! behind a produce backlog.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use covet_protocol::internal::raft_transport_client::RaftTransportClient;
use covet_protocol::internal::raft_transport_server::RaftTransport;
use covet_protocol::internal::{GroupMessage, RaftAck, RaftBatch};
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

/// Messages queued per peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Bytes of entry data queued per peer before new messages are dropped:
/// what a slow or dead peer can cost this node's memory.
const PEER_QUEUE_BYTES: usize = 64 << 20;
/// Messages sent in one batch at most.
const MAX_BATCH_MESSAGES: usize = 512;
/// Bytes of encoded messages in one batch, roughly at most.
const MAX_BATCH_BYTES: usize = 4 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A message from a peer, for the driver.
pub struct Inbound {
    pub group: u64,
    pub message: Message,
}

/// Client addresses peers announced, by node id.
#[derive(Default)]
pub struct Directory {
    addresses: RwLock<HashMap<u64, String>>,
}

impl Directory {
    pub fn set(&self, node: u64, address: &str) {
        let mut map = self.addresses.write().expect("directory lock");
        if map.get(&node).map(String::as_str) != Some(address) {
            map.insert(node, address.to_string());
        }
    }

    pub fn get(&self, node: u64) -> Option<String> {
        self.addresses
            .read()
            .expect("directory lock")
            .get(&node)
            .cloned()
    }
}

/// The sending side: one queue and one dialing task per peer.
#[derive(Clone, Default)]
pub struct Transport {
    peers: Arc<HashMap<u64, PeerQueue>>,
}

/// One peer's queue, bounded in messages and in bytes.
struct PeerQueue {
    tx: mpsc::Sender<(u64, Message)>,
    bytes: Arc<AtomicUsize>,
}

/// Entry bytes a message carries (what dominates its size).
fn weight(m: &Message) -> usize {
    64 + m
        .entries
        .iter()
        .map(|e| e.data.len() + e.context.len())
        .sum::<usize>()
        + m.snapshot.as_ref().map_or(0, |s| s.data.len())
}

impl crate::group::Outbox for Transport {
    fn send(&self, group: u64, message: Message) -> bool {
        Transport::send(self, group, message)
    }
}

impl Transport {
    /// Starts a sender task per peer (every entry of `peers` but `me`).
    pub fn start(
        me: u64,
        client_address: String,
        peers: &HashMap<u64, SocketAddr>,
        runtime: &tokio::runtime::Handle,
    ) -> Transport {
        let mut queues = HashMap::new();
        for (&id, &addr) in peers {
            if id == me {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let bytes = Arc::new(AtomicUsize::new(0));
            let peer = PeerSender {
                me,
                client_address: client_address.clone(),
                addr,
                rx,
                bytes: bytes.clone(),
                carry: None,
            };
            runtime.spawn(peer.run());
            queues.insert(id, PeerQueue { tx, bytes });
        }
        Transport {
            peers: Arc::new(queues),
        }
    }

    /// Queues a message for its destination. Returns false if it was
    /// dropped (unknown peer or full queue), so the caller can tell Raft
    /// the peer is unreachable.
    pub fn send(&self, group: u64, message: Message) -> bool {
        let Some(q) = self.peers.get(&message.to) else {
            return false;
        };
        let w = weight(&message);
        let queued = q.bytes.load(Ordering::Relaxed);
        // One message alone may exceed the bound (a batch near the largest
        // allowed size); it just cannot queue behind others.
        if queued > 0 && queued + w > PEER_QUEUE_BYTES {
            return false;
        }
        q.bytes.fetch_add(w, Ordering::Relaxed);
        if q.tx.try_send((group, message)).is_err() {
            q.bytes.fetch_sub(w, Ordering::Relaxed);
            return false;
        }
        true
    }
}

struct PeerSender {
    me: u64,
    client_address: String,
    addr: SocketAddr,
    rx: mpsc::Receiver<(u64, Message)>,
    /// Bytes queued for this peer, shared with the senders.
    bytes: Arc<AtomicUsize>,
    /// A message taken from the queue that starts the next batch.
    carry: Option<(u64, Message)>,
}

impl PeerSender {
    /// Dials, streams, and redials with backoff until the queue closes.
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::time::Instant::now();
            match self.stream_once().await {
                Ok(true) => return,
                Ok(false) => backoff = BACKOFF_MIN,
                Err(e) => {
                    tracing::debug!(peer = %self.addr, error = %e, "raft transport down");
                    // A link that was up for a while starts over; one that
                    // keeps failing at once backs off further.
                    backoff = if started.elapsed() > BACKOFF_MAX {
                        BACKOFF_MIN
                    } else {
                        (backoff * 2).min(BACKOFF_MAX)
                    };
                }
            }
            // While down, drop what is queued: it is stale by the time the
            // peer is back, and Raft resends what matters.
            while let Ok((_, m)) = self.rx.try_recv() {
                self.bytes.fetch_sub(weight(&m), Ordering::Relaxed);
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// One connection's life. `Ok(true)` when the queue closed (shutdown).
    async fn stream_once(&mut self) -> Result<bool, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .initial_stream_window_size(crate::server::STREAM_WINDOW)
            .initial_connection_window_size(crate::server::CONNECTION_WINDOW);
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<RaftBatch>(16);
        let mut client = RaftTransportClient::new(channel)
            .max_encoding_message_size(crate::server::MAX_MESSAGE_BYTES)
            .max_decoding_message_size(crate::server::MAX_MESSAGE_BYTES);
        let call = tokio::spawn(async move {
            client
                .send(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        tracing::debug!(peer = %self.addr, "raft transport up");
        loop {
            let first = match self.carry.take() {
                Some(m) => Some(m),
                None => self.rx.recv().await,
            };
            let Some(first) = first else {
                return Ok(true);
            };
            let batch = self.batch(first);
            if tx.send(batch).await.is_err() {
                let outcome = call.await.map_err(|e| e.to_string())?;
                return Err(match outcome {
                    Ok(_) => "peer closed the stream".into(),
                    Err(status) => status.to_string(),
                });
            }
        }
    }

    /// Encodes `first` and whatever else is queued, within the limits.
    fn batch(&mut self, first: (u64, Message)) -> RaftBatch {
        let mut messages = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some((group, m)) = next.take() {
            self.bytes.fetch_sub(weight(&m), Ordering::Relaxed);
            match m.write_to_bytes() {
                Ok(encoded) => {
                    bytes += encoded.len();
                    messages.push(GroupMessage {
                        group,
                        message: Bytes::from(encoded),
                    });
                }
                Err(e) => tracing::error!(error = %e, "cannot encode raft message"),
            }
            if messages.len() >= MAX_BATCH_MESSAGES {
                break;
            }
            match self.rx.try_recv() {
                // A message that would take the batch past its size waits
                // for the next one, so a batch never exceeds the gRPC
                // message limit by more than one message.
                Ok(m) if bytes + weight(&m.1) > MAX_BATCH_BYTES => {
                    self.carry = Some(m);
                    break;
                }
                Ok(m) => next = Some(m),
                Err(_) => break,
            }
        }
        RaftBatch {
            from: self.me,
            client_address: self.client_address.clone(),
            messages,
        }
    }
}

/// The receiving side: the `RaftTransport` service.
pub struct TransportService {
    pub inbound: mpsc::Sender<Inbound>,
    pub directory: Arc<Directory>,
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn send(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            if !batch.client_address.is_empty() {
                self.directory.set(batch.from, &batch.client_address);
            }
            for gm in batch.messages {
                let message = match Message::parse_from_carllerche_bytes(&gm.message) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(from = batch.from, error = %e, "undecodable raft message");
                        continue;
                    }
                };
                if message.from != batch.from {
                    tracing::warn!(
                        from = batch.from,
                        claimed = message.from,
                        "raft message with a forged sender"
                    );
                    continue;
                }
                if self
                    .inbound
                    .send(Inbound {
                        group: gm.group,
                        message,
                    })
                    .await
                    .is_err()
                {
                    return Err(Status::unavailable("node is shutting down"));
                }
            }
        }
        Ok(Response::new(RaftAck {}))
    }
}
