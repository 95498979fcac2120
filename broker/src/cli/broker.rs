//! `covet broker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use covet_broker::server::{self, BrokerConfig};
use tracing_subscriber::EnvFilter;

#[derive(Args, Debug)]
pub struct BrokerArgs {
    /// Directory holding the node's logs and state.
    #[arg(long, default_value = "./covet-data")]
    data_dir: PathBuf,
    /// Address to serve clients on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: SocketAddr,
    /// This node's id.
    #[arg(long, default_value_t = 1)]
    node_id: u64,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    #[arg(long, default_value = "info", env = "COVET_LOG")]
    log_level: String,
    /// Size at which a log segment is closed and a new one started.
    #[arg(long, default_value_t = 64 << 20)]
    segment_bytes: u64,
    /// How often retention is enforced, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    retention_check_ms: u64,
}

pub async fn run(args: BrokerArgs, started: std::time::Instant) -> anyhow::Result<()> {
    tune_allocator();
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("bad --log-level '{}': {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if args.node_id == 0 {
        anyhow::bail!("--node-id must be at least 1");
    }
    let config = BrokerConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        node_id: args.node_id,
        segment_bytes: args.segment_bytes.max(4096),
        retention_interval: Duration::from_millis(args.retention_check_ms.max(10)),
        started,
    };
    server::run(config, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Keeps glibc from holding on to freed batch buffers. Its mmap threshold
/// otherwise adapts upwards after the first large frees, so megabyte
/// batches end up in arenas that are never returned to the system and the
/// broker's idle RSS stays at its peak. A fixed threshold sends them to
/// mmap, which gives them back when they are freed.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called once,
    // before the runtime allocates in earnest.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}
