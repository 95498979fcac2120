//! Running a broker node: open the state, start the Raft driver, serve gRPC,
//! announce readiness, and shut down cleanly on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use covet_protocol::api::covet_server::CovetServer;
use covet_raft_store::LogOptions;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::driver::{self, DriverConfig};
use crate::service::{CovetService, MAX_MAX_BATCH_BYTES};

/// HTTP/2 flow-control windows: how much a peer may send on one stream,
/// and on one connection, before this side has read it.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// How long in-flight calls get to finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker node's settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub node_id: u64,
    pub segment_bytes: u64,
    pub retention_interval: Duration,
    /// When the process started, for the start-to-ready figure.
    pub started: std::time::Instant,
}

/// Runs a broker until `stop` resolves (a signal, in the binary).
pub async fn run(
    config: BrokerConfig,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let driver_config = DriverConfig {
        node_id: config.node_id,
        data_dir: config.data_dir.clone(),
        log_options: LogOptions {
            segment_bytes: config.segment_bytes,
        },
        retention_interval: config.retention_interval,
    };
    let mut running = driver::start(driver_config, shutdown_rx.clone())
        .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let service = CovetService::new(running.handle.clone(), address, shutdown_rx.clone());
    let max_message = MAX_MAX_BATCH_BYTES as usize + (1 << 20);
    let mut server_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Batches are up to MAX_MAX_BATCH_BYTES; HTTP/2's small default
            // windows would stall a stream on every large batch.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .add_service(
                CovetServer::new(service)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = server_shutdown.wait_for(|s| *s).await;
            }),
    );
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
    let outcome = tokio::select! {
        _ = &mut stop => Ok(()),
        r = &mut running.done => match r {
            Ok(Err(e)) => Err(anyhow::anyhow!("raft driver failed: {e}")),
            _ => Err(anyhow::anyhow!("raft driver stopped")),
        },
    };
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, server).await.is_err() {
        tracing::warn!("calls still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    if let Ok(Ok(Err(e))) = tokio::time::timeout(DRAIN_TIMEOUT, running.done).await {
        tracing::error!(error = %e, "raft driver failed while stopping");
    }
    println!("covet broker stopped");
    outcome
}
