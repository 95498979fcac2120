//! The Raft transport between nodes.
//!
//! Every node keeps one long-lived gRPC stream to each peer (the
//! `RaftTransport.Send` call it dials) and sends batches of raft-rs
//! messages on it, each encoded with raft-rs's own protobuf codec and
//! tagged with its group. Messages for a peer wait in a queue bounded in
//! messages and in bytes of entry data (64 MiB): when
//! the peer is slow the queue fills and further messages are
//! dropped, which Raft tolerates (it retries by its own timers), so a slow
//! peer never makes this node's memory grow. A broken stream is redialed
//! with exponential backoff; from the failure until a dial succeeds again
//! the peer counts as down and messages for it are refused at once, so
//! the caller reports it unreachable (a leader stops pipelining appends to
//! it and probes instead) and nothing queued while it was gone is
//! delivered, stale, when it comes back. A message larger than [`CHUNK_BYTES`] once
//! encoded (a snapshot, in practice) travels in chunks of that size, so no
//! gRPC message grows with the state it carries; the receiver reassembles
//! the chunks of one stream in order, bounded by [`MAX_CHUNKED_BYTES`].
//!
//! The receiving side hands decoded messages to the Raft driver over its
//! own channel, ahead of client requests, so heartbeats are not stuck
//! behind a produce backlog. That channel is bounded in messages and, by
//! a semaphore of [`INBOUND_BYTES`] whose permits travel with the messages
//! of each received batch until the driver has stepped them, in bytes: a
//! peer flooding large messages is slowed down (HTTP/2 flow control stops
//! it) instead of pinning memory. Not counted: a chunked message being
//! reassembled (at most [`MAX_CHUNKED_BYTES`] per stream).
//!
//! **Who may send.** The service accepts batches only from the node ids
//! of the configuration (`--peers`, this node excluded); any other `from`
//! ends the stream with `PERMISSION_DENIED`, logged once per stream. The
//! client address a peer announces must be a socket address of at most
//! [`MAX_ADDRESS_BYTES`] bytes, and the directory holds one per configured
//! node, so it cannot grow. Each message must be from the batch's sender,
//! and messages no legitimate peer sends are dropped before raft-rs sees
//! them (see `faults::implausible`). Until mutual TLS lands, nothing proves
//! a sender *is* the node it names: anyone who reaches the peer port can
//! still speak as a configured node (disrupt elections, redirect clients to
//! another valid address). Keep the peer port on a private network.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use covet_protocol::internal::raft_transport_client::RaftTransportClient;
use covet_protocol::internal::raft_transport_server::RaftTransport;
use covet_protocol::internal::{GroupMessage, RaftAck, RaftBatch};
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
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
/// Largest piece of one encoded message in a `GroupMessage`.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest message the receiver reassembles from chunks.
pub const MAX_CHUNKED_BYTES: usize = 256 << 20;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Longest client address a peer may announce.
pub const MAX_ADDRESS_BYTES: usize = 256;
/// Bytes of peer messages received and not yet stepped by the driver.
pub const INBOUND_BYTES: usize = 256 << 20;

/// A message from a peer, for the driver.
pub struct Inbound {
    pub group: u64,
    pub message: Message,
    /// The bytes of [`INBOUND_BYTES`] this message pins: those of the gRPC
    /// batch it was decoded from (its fields share that buffer), released
    /// when the driver has dropped every message of the batch; plus its own
    /// size when it was reassembled from chunks into a buffer of its own.
    pub permit: Vec<Arc<OwnedSemaphorePermit>>,
}

/// Client addresses peers announced, by node id.
#[derive(Default)]
pub struct Directory {
    addresses: RwLock<HashMap<u64, String>>,
}

impl Directory {
    /// Records `node`'s client address. The caller admits only configured
    /// nodes, so the directory holds at most one entry per node of the
    /// configuration.
    pub fn set(&self, node: u64, address: &str) {
        let mut map = self.addresses.write().unwrap_or_else(|e| e.into_inner());
        if map.get(&node).map(String::as_str) != Some(address) {
            map.insert(node, address.to_string());
        }
    }

    /// How many addresses are known.
    pub fn len(&self) -> usize {
        self.addresses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no address is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, node: u64) -> Option<String> {
        self.addresses
            .read()
            .unwrap_or_else(|e| e.into_inner())
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
    /// False from a failed stream or dial until the next dial succeeds.
    up: Arc<AtomicBool>,
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
            // Up until a dial fails: what is sent before the first dial
            // completes waits for it.
            let up = Arc::new(AtomicBool::new(true));
            let peer = PeerSender {
                me,
                client_address: client_address.clone(),
                addr,
                rx,
                bytes: bytes.clone(),
                up: up.clone(),
                pending: VecDeque::new(),
            };
            runtime.spawn(peer.run());
            queues.insert(id, PeerQueue { tx, bytes, up });
        }
        Transport {
            peers: Arc::new(queues),
        }
    }

    /// Queues a message for its destination. Returns false if it was
    /// dropped (unknown peer, peer down, or full queue), so the caller can
    /// tell Raft the peer is unreachable.
    pub fn send(&self, group: u64, message: Message) -> bool {
        let Some(q) = self.peers.get(&message.to) else {
            return false;
        };
        if !q.up.load(Ordering::Relaxed) {
            return false;
        }
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
    /// Whether the peer counts as reachable, shared with the senders.
    up: Arc<AtomicBool>,
    /// Encoded messages (or chunks of one) taken from the queue and not
    /// sent yet, in order; about one batch's worth at most.
    pending: VecDeque<GroupMessage>,
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
                    self.up.store(false, Ordering::Relaxed);
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
            // peer is back, and Raft resends what matters. New messages are
            // refused until a dial succeeds (`up`), so the queue stays empty
            // through the backoff.
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
        self.up.store(true, Ordering::Relaxed);
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
        // Chunks left from a broken stream cannot be completed on this one.
        self.pending.clear();
        loop {
            if self.pending.is_empty() {
                let Some(first) = self.rx.recv().await else {
                    return Ok(true);
                };
                self.fill(first);
            }
            let batch = self.take_batch();
            if tx.send(batch).await.is_err() {
                let outcome = call.await.map_err(|e| e.to_string())?;
                return Err(match outcome {
                    Ok(_) => "peer closed the stream".into(),
                    Err(status) => status.to_string(),
                });
            }
        }
    }

    /// Encodes `first` and whatever else is queued into `pending`, until
    /// about one batch's worth is there.
    fn fill(&mut self, first: (u64, Message)) {
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some((group, m)) = next.take() {
            self.bytes.fetch_sub(weight(&m), Ordering::Relaxed);
            match m.write_to_bytes() {
                Ok(encoded) => {
                    bytes += encoded.len();
                    self.pending.extend(chunked(group, Bytes::from(encoded)));
                }
                Err(e) => tracing::error!(error = %e, "cannot encode raft message"),
            }
            if bytes >= MAX_BATCH_BYTES || self.pending.len() >= MAX_BATCH_MESSAGES {
                break;
            }
            next = self.rx.try_recv().ok();
        }
    }

    /// The next batch from `pending`: as many messages as fit the limits,
    /// and at least one, so a batch never exceeds the gRPC message limit by
    /// more than one chunk or message.
    fn take_batch(&mut self) -> RaftBatch {
        let mut messages = Vec::new();
        let mut bytes = 0;
        while let Some(m) = self.pending.front() {
            let len = m.message.len();
            if !messages.is_empty()
                && (bytes + len > MAX_BATCH_BYTES || messages.len() >= MAX_BATCH_MESSAGES)
            {
                break;
            }
            bytes += len;
            messages.extend(self.pending.pop_front());
        }
        RaftBatch {
            from: self.me,
            client_address: self.client_address.clone(),
            messages,
        }
    }
}

/// One encoded message as it goes on the wire: whole, or in chunks of
/// [`CHUNK_BYTES`].
fn chunked(group: u64, encoded: Bytes) -> Vec<GroupMessage> {
    if encoded.len() <= CHUNK_BYTES {
        return vec![GroupMessage {
            group,
            message: encoded,
            chunk: 0,
            chunks: 0,
        }];
    }
    let chunks = encoded.len().div_ceil(CHUNK_BYTES);
    (0..chunks)
        .map(|i| GroupMessage {
            group,
            message: encoded.slice(i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(encoded.len())),
            chunk: i as u32,
            chunks: chunks as u32,
        })
        .collect()
}

/// Reassembles chunked messages of one stream. Chunks of one message
/// arrive consecutively and in order (one sender, one stream); anything
/// else is dropped, and Raft resends what matters.
#[derive(Default)]
struct Reassembly {
    /// Group, chunks expected, chunks seen, bytes so far.
    partial: Option<(u64, u32, u32, Vec<u8>)>,
}

impl Reassembly {
    /// Offers one `GroupMessage`; returns the whole encoded message once
    /// complete, or an error saying why a chunk was dropped.
    fn offer(&mut self, gm: GroupMessage) -> Result<Option<Bytes>, String> {
        if gm.chunks <= 1 {
            self.partial = None;
            return Ok(Some(gm.message));
        }
        if gm.chunk == 0 {
            let bound = (gm.chunks as usize).saturating_mul(CHUNK_BYTES);
            if bound > MAX_CHUNKED_BYTES + CHUNK_BYTES {
                self.partial = None;
                return Err(format!("message of {} chunks is too large", gm.chunks));
            }
            self.partial = Some((gm.group, gm.chunks, 0, Vec::new()));
        }
        let Some((group, chunks, seen, buf)) = self.partial.as_mut() else {
            return Err(format!("chunk {} without its first chunk", gm.chunk));
        };
        if *group != gm.group || *chunks != gm.chunks || *seen != gm.chunk {
            self.partial = None;
            return Err("chunk out of sequence".into());
        }
        if buf.len() + gm.message.len() > MAX_CHUNKED_BYTES || gm.message.len() > CHUNK_BYTES {
            self.partial = None;
            return Err("chunked message too large".into());
        }
        buf.extend_from_slice(&gm.message);
        *seen += 1;
        if *seen < *chunks {
            return Ok(None);
        }
        let whole = self.partial.take().map(|(_, _, _, b)| Bytes::from(b));
        Ok(whole)
    }
}

/// The receiving side: the `RaftTransport` service.
pub struct TransportService {
    pub inbound: mpsc::Sender<Inbound>,
    pub directory: Arc<Directory>,
    /// The node ids allowed to send: the configured peers, not this node.
    pub peers: std::collections::HashSet<u64>,
    /// Bytes of messages waiting for the driver (see [`INBOUND_BYTES`]).
    pub inbound_bytes: Arc<Semaphore>,
}

impl TransportService {
    pub fn new(
        me: u64,
        peers: &HashMap<u64, SocketAddr>,
        inbound: mpsc::Sender<Inbound>,
        directory: Arc<Directory>,
    ) -> TransportService {
        TransportService {
            inbound,
            directory,
            peers: peers.keys().copied().filter(|&id| id != me).collect(),
            inbound_bytes: Arc::new(Semaphore::new(INBOUND_BYTES)),
        }
    }

    /// Takes `bytes` of the inbound budget, waiting until the driver has
    /// released enough. One claim takes half the budget at most: a stream
    /// holds at most two at once (its batch's, and a reassembled message's),
    /// so it never waits for bytes it holds itself.
    async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, Status> {
        let n = bytes.clamp(1, INBOUND_BYTES / 2) as u32;
        self.inbound_bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))
    }

    /// Refuses a batch no configured peer sends; records its address.
    fn admit(&self, batch: &RaftBatch) -> Result<(), Status> {
        if !self.peers.contains(&batch.from) {
            tracing::warn!(from = batch.from, "raft batch from an unknown node refused");
            return Err(Status::permission_denied(format!(
                "node {} is not a peer of this node",
                batch.from
            )));
        }
        if !batch.client_address.is_empty() {
            let address = &batch.client_address;
            if address.len() > MAX_ADDRESS_BYTES || address.parse::<SocketAddr>().is_err() {
                tracing::warn!(
                    from = batch.from,
                    len = address.len(),
                    "raft batch with a bad client address refused"
                );
                return Err(Status::invalid_argument(format!(
                    "client address must be HOST:PORT of at most {MAX_ADDRESS_BYTES} bytes"
                )));
            }
            self.directory.set(batch.from, address);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn send(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut reassembly = Reassembly::default();
        // Dropped messages are logged once per stream, at the first: a
        // flood of bad ones must not become a flood of log lines.
        let mut dropped = 0u64;
        let mut drop_message = |from: u64, group: u64, why: String| {
            if dropped == 0 {
                tracing::warn!(
                    from,
                    group,
                    why,
                    "raft message dropped (logged once per stream)"
                );
            }
            dropped += 1;
        };
        while let Some(batch) = stream.message().await? {
            self.admit(&batch)?;
            // Decoded messages share the batch's buffer, which lives until
            // the last of them is dropped: the batch is what they pin.
            // Waits while the driver holds the byte budget: the stream stops
            // being read, and HTTP/2 flow control stops the sender.
            let size: usize = batch.messages.iter().map(|m| m.message.len()).sum();
            let frame = Arc::new(self.reserve(size).await?);
            for gm in batch.messages {
                let group = gm.group;
                let chunked = gm.chunks > 1;
                let encoded = match reassembly.offer(gm) {
                    Ok(Some(encoded)) => encoded,
                    Ok(None) => continue,
                    Err(e) => {
                        drop_message(batch.from, group, format!("chunk dropped: {e}"));
                        continue;
                    }
                };
                let message = match Message::parse_from_carllerche_bytes(&encoded) {
                    Ok(m) => m,
                    Err(e) => {
                        drop_message(batch.from, group, format!("undecodable: {e}"));
                        continue;
                    }
                };
                if message.from != batch.from {
                    let why = format!("claims to be from node {}", message.from);
                    drop_message(batch.from, group, why);
                    continue;
                }
                let mut permit = vec![frame.clone()];
                if chunked {
                    permit.push(Arc::new(self.reserve(encoded.len()).await?));
                }
                let inbound = Inbound {
                    group,
                    message,
                    permit,
                };
                if self.inbound.send(inbound).await.is_err() {
                    return Err(Status::unavailable("node is shutting down"));
                }
            }
        }
        Ok(Response::new(RaftAck {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reassemble(parts: Vec<GroupMessage>) -> Vec<Result<Option<Bytes>, String>> {
        let mut r = Reassembly::default();
        parts.into_iter().map(|p| r.offer(p)).collect()
    }

    #[test]
    fn small_messages_travel_whole() {
        let parts = chunked(3, Bytes::from(vec![7u8; CHUNK_BYTES]));
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].chunks, 0);
    }

    #[test]
    fn large_messages_are_chunked_and_reassembled() {
        let data: Vec<u8> = (0..(2 * CHUNK_BYTES + 17)).map(|i| i as u8).collect();
        let parts = chunked(9, Bytes::from(data.clone()));
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| p.message.len() <= CHUNK_BYTES));
        let out = reassemble(parts);
        assert_eq!(out[0], Ok(None));
        assert_eq!(out[1], Ok(None));
        assert_eq!(out[2], Ok(Some(Bytes::from(data))));
    }

    #[test]
    fn chunks_out_of_sequence_are_dropped_and_the_next_message_still_decodes() {
        let data = Bytes::from(vec![1u8; 2 * CHUNK_BYTES + 1]);
        let mut parts = chunked(9, data.clone());
        parts.remove(1);
        parts.extend(chunked(9, Bytes::from_static(b"whole")));
        let out = reassemble(parts);
        assert_eq!(out[0], Ok(None));
        assert!(out[1].is_err(), "{:?}", out[1]);
        assert_eq!(out[2], Ok(Some(Bytes::from_static(b"whole"))));
        // A lone middle chunk is refused too.
        let mut r = Reassembly::default();
        let middle = chunked(9, data).remove(1);
        assert!(r.offer(middle).is_err());
    }

    /// A transport service for node 1 (peer 2 allowed) whose inbound queue
    /// holds `budget` bytes, on a loopback port; its address and the queue.
    async fn serve_with_budget(budget: usize) -> (std::net::SocketAddr, mpsc::Receiver<Inbound>) {
        use covet_protocol::internal::raft_transport_server::RaftTransportServer;
        let (tx, rx) = mpsc::channel(16_384);
        let mut peers = HashMap::new();
        peers.insert(2, "127.0.0.1:1".parse().unwrap());
        let mut service = TransportService::new(1, &peers, tx, Arc::default());
        service.inbound_bytes = Arc::new(Semaphore::new(budget));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, rx)
    }

    /// A peer sending large messages while the driver takes none can pin
    /// only the byte budget; the rest waits in the peer's own stream (flow
    /// control), and flows once the driver catches up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_inbound_queue_is_bounded_in_bytes() {
        const BUDGET: usize = 8 << 20;
        const SENT: usize = 24;
        let (addr, mut rx) = serve_with_budget(BUDGET).await;
        let mut m = Message {
            from: 2,
            to: 1,
            ..Default::default()
        };
        m.set_entries(
            vec![raft::prelude::Entry {
                data: vec![1u8; 900 << 10].into(),
                ..Default::default()
            }]
            .into(),
        );
        let encoded = Bytes::from(m.write_to_bytes().unwrap());
        let batches: Vec<RaftBatch> = (0..SENT)
            .map(|_| RaftBatch {
                from: 2,
                client_address: String::new(),
                messages: chunked(9, encoded.clone()),
            })
            .collect();
        let mut client = RaftTransportClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let call =
            tokio::spawn(async move { client.send(tokio_stream::iter(batches)).await.is_ok() });
        let most = BUDGET / encoded.len();
        // The queue fills up to the budget...
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while rx.len() < most && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            rx.len() <= most,
            "{} messages queued past the budget",
            rx.len()
        );
        assert_eq!(rx.len(), most, "queue never reached the budget");
        // ...and goes no further while nothing is taken.
        let over = tokio::time::timeout(Duration::from_millis(500), async {
            while rx.len() <= most {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            over.is_err(),
            "{} messages queued past the budget",
            rx.len()
        );
        assert!(!call.is_finished());
        // Taking them (dropping their permits) lets the rest through.
        let mut got = 0;
        while got < SENT {
            let taken = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
            assert!(matches!(taken, Ok(Some(_))), "only {got} messages arrived");
            got += 1;
        }
        let ok = tokio::time::timeout(Duration::from_secs(20), call).await;
        assert!(matches!(ok, Ok(Ok(true))), "{ok:?}");
    }

    /// A small message decoded from a large batch keeps the whole batch's
    /// buffer alive, so it is charged the batch: padding a batch with bytes
    /// that are dropped does not get around the budget.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_message_in_a_large_batch_is_charged_the_batch() {
        const BUDGET: usize = 8 << 20;
        let (addr, mut rx) = serve_with_budget(BUDGET).await;
        let small = Message {
            from: 2,
            to: 1,
            ..Default::default()
        };
        let small = Bytes::from(small.write_to_bytes().unwrap());
        let padding = Bytes::from(vec![0xffu8; 3 << 20]);
        let batches: Vec<RaftBatch> = (0..16)
            .map(|_| RaftBatch {
                from: 2,
                client_address: String::new(),
                // Undecodable padding, sent whole; dropped on arrival.
                messages: vec![
                    GroupMessage {
                        group: 9,
                        message: padding.clone(),
                        chunk: 0,
                        chunks: 0,
                    },
                    chunked(9, small.clone()).remove(0),
                ],
            })
            .collect();
        let mut client = RaftTransportClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_encoding_message_size(usize::MAX);
        let call =
            tokio::spawn(async move { client.send(tokio_stream::iter(batches)).await.is_ok() });
        let most = BUDGET / (padding.len() + small.len());
        let over = tokio::time::timeout(Duration::from_secs(2), async {
            while rx.len() <= most {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(over.is_err(), "{} batches pinned past the budget", rx.len());
        assert_eq!(rx.len(), most);
        for got in 0..16 {
            let taken = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await;
            assert!(matches!(taken, Ok(Some(_))), "only {got} messages arrived");
        }
        let ok = tokio::time::timeout(Duration::from_secs(20), call).await;
        assert!(matches!(ok, Ok(Ok(true))), "{ok:?}");
    }

    #[test]
    fn a_claimed_size_beyond_the_bound_is_refused_before_buffering() {
        let gm = GroupMessage {
            group: 1,
            message: Bytes::from_static(b"x"),
            chunk: 0,
            chunks: u32::MAX,
        };
        assert!(Reassembly::default().offer(gm).is_err());
    }
}
