//! Running a broker node: open the state, start the Raft driver and its
//! transport to peers, serve gRPC to clients and peers, announce readiness,
//! and shut down cleanly on SIGINT/SIGTERM.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use covet_protocol::api::covet_server::CovetServer;
use covet_protocol::internal::raft_transport_server::RaftTransportServer;
use covet_raft_store::LogOptions;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::driver::{self, DriverConfig};
use crate::service::{CovetService, MAX_MAX_BATCH_BYTES};
use crate::transport::{Directory, Transport, TransportService};

/// HTTP/2 flow-control windows: how much a peer may send on one stream,
/// and on one connection, before this side has read it.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest gRPC message sent or accepted: the largest batch plus room for
/// the rest of the message.
pub const MAX_MESSAGE_BYTES: usize = MAX_MAX_BATCH_BYTES as usize + (1 << 20);
/// Peer messages waiting for the driver before peers are slowed down.
const INBOUND_QUEUE: usize = 16_384;
/// How long in-flight calls get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Peer connections served at once: each peer keeps one or two (plus
/// reconnects), so this covers clusters far larger than Covet's, and a
/// flood on the peer port takes at most this many descriptors. Counted
/// beside the client limit and the segment cache in the descriptor
/// budget (`covet broker --max-connections`).
const MAX_PEER_CONNECTIONS: usize = 64;
/// How long accepting pauses when the process is out of descriptors: the
/// pending connection stays in the backlog, and accepting again at once
/// would fail again at once (a busy loop).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning per this interval about refused connections.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// A broker node's settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub node_id: u64,
    /// Where peers reach this node's Raft transport; `None` for a node that
    /// runs alone.
    pub peer_listen: Option<SocketAddr>,
    /// Every node of the cluster (this one included) and the address other
    /// nodes dial to reach it. Empty for a node that runs alone.
    pub peers: HashMap<u64, SocketAddr>,
    pub segment_bytes: u64,
    pub retention_interval: Duration,
    /// Client connections served at once; more are accepted and closed at
    /// once. Keeps sockets from taking the descriptors storage needs.
    pub max_connections: usize,
    /// When the process started, for the start-to-ready figure.
    pub started: std::time::Instant,
}

impl BrokerConfig {
    fn cluster_nodes(&self) -> Vec<u64> {
        let mut nodes: Vec<u64> = self.peers.keys().copied().collect();
        if !nodes.contains(&self.node_id) {
            nodes.push(self.node_id);
        }
        nodes.sort_unstable();
        nodes
    }
}

/// Runs a broker until `stop` resolves (a signal, in the binary).
pub async fn run(
    config: BrokerConfig,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    covet_raft_store::create_dir_durable(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Bind first: the client address is announced to peers.
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let peer_listener = match config.peer_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding peer address {addr}"))?,
        ),
        None => None,
    };
    let transport = Transport::start(
        config.node_id,
        address.to_string(),
        &config.peers,
        &tokio::runtime::Handle::current(),
    );
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let driver_config = DriverConfig {
        node_id: config.node_id,
        data_dir: config.data_dir.clone(),
        log_options: LogOptions {
            segment_bytes: config.segment_bytes,
        },
        retention_interval: config.retention_interval,
        initial_nodes: config.cluster_nodes(),
    };
    let mut running = driver::start(driver_config, shutdown_rx.clone(), transport, inbound_rx)
        .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
    let directory = Arc::new(Directory::default());
    let service = CovetService::new(
        running.handle.clone(),
        address,
        config.cluster_nodes(),
        directory.clone(),
        shutdown_rx.clone(),
    );
    let client_slots = Arc::new(Semaphore::new(config.max_connections));
    let server = tokio::spawn(serve_clients(
        listener,
        client_slots,
        service,
        shutdown_rx.clone(),
    ));
    if let Some(peer_listener) = peer_listener {
        let peers = TransportService::new(config.node_id, &config.peers, inbound_tx, directory);
        tokio::spawn(serve_peers(peer_listener, peers, shutdown_rx.clone()));
    }
    tokio::pin!(stop);
    tokio::select! {
        r = running.ready.wait_for(|r| *r) => { r.context("raft driver stopped before ready")?; }
        r = &mut running.done => return Err(anyhow::anyhow!("raft driver failed at start: {:?}", r)),
        _ = &mut stop => { let _ = shutdown_tx.send(true); return Ok(()); }
    }
    println!(
        "covet broker ready: node {} listening on {address}, data dir {}, started in {} ms",
        config.node_id,
        config.data_dir.display(),
        config.started.elapsed().as_millis()
    );
    tracing::info!(%address, "ready");
    let (outcome, driver_done) = tokio::select! {
        _ = &mut stop => (Ok(()), false),
        r = &mut running.done => match r {
            Ok(Err(e)) => (Err(anyhow::anyhow!("raft driver failed: {e}")), true),
            _ => (Err(anyhow::anyhow!("raft driver stopped")), true),
        },
    };
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, server).await.is_err() {
        tracing::warn!("calls still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    // A receiver that already answered must not be polled again.
    if !driver_done {
        if let Ok(Ok(Err(e))) = tokio::time::timeout(DRAIN_TIMEOUT, running.done).await {
            tracing::error!(error = %e, "raft driver failed while stopping");
        }
    }
    println!("covet broker stopped");
    outcome
}

/// gRPC server settings shared by the client and peer endpoints.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Batches are up to MAX_MAX_BATCH_BYTES; HTTP/2's small default
        // windows would stall a stream on every large batch.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

async fn serve_clients(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    service: CovetService,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    server_builder()
        .add_service(
            CovetServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(limited_incoming(listener, slots, "client"), async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

/// Serves peers' Raft streams. It keeps running while the driver hands
/// its leaderships over at shutdown, and ends with the process.
async fn serve_peers(
    listener: TcpListener,
    service: TransportService,
    _shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    server_builder()
        .add_service(
            RaftTransportServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(limited_incoming(
            listener,
            Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS)),
            "peer",
        ))
        .await
}

/// An accepted connection holding one of its listener's slots until it
/// closes (when the server drops it).
struct Limited {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

/// Accepted connections, each with a slot from `slots`.
///
/// Every connection costs a descriptor, and so does every segment file
/// storage opens; a process out of descriptors fails storage writes (a
/// segment roll, a directory fsync). So connections beyond the slots are
/// accepted and closed at once (the client gets a prompt error rather than
/// a hang), keeping descriptors for storage. If accepting fails because
/// the process or the system is out of descriptors anyway, accepting
/// pauses for [`ACCEPT_BACKOFF`] and resumes: tonic would otherwise retry
/// at once, spinning on a connection it cannot accept. `TCP_NODELAY` is
/// set here, as the server builder's setting does not apply to a custom
/// stream of connections.
fn limited_incoming(
    listener: TcpListener,
    slots: Arc<Semaphore>,
    what: &'static str,
) -> impl Stream<Item = io::Result<Limited>> {
    let state = (listener, slots, None::<Instant>);
    futures::stream::unfold(state, move |(listener, slots, mut warned)| async move {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_out_of_descriptors(&e) => {
                    if should_log(&mut warned) {
                        tracing::warn!(error = %e, "out of file descriptors: not accepting {what} connections for a moment");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                // Tonic logs it and asks for the next one.
                Err(e) => return Some((Err(e), (listener, slots, warned))),
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                if should_log(&mut warned) {
                    tracing::warn!(%addr, "too many {what} connections: refusing new ones");
                }
                drop(stream);
                continue;
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let conn = Limited {
                stream,
                _slot: slot,
            };
            return Some((Ok(conn), (listener, slots, warned)));
        }
    })
}

/// Whether a rate-limited warning is due (at most one per
/// [`REFUSAL_LOG_INTERVAL`]), noting it if so.
fn should_log(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL) {
        return false;
    }
    *last = Some(now);
    true
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
