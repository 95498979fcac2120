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
    /// Address this node's Raft transport listens on, for its peers.
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// The cluster: every node's id and the address its peers dial,
    /// ID=HOST:PORT[,ID=HOST:PORT...]. Omit to run alone.
    #[arg(long, value_parser = parse_peers, default_value = "")]
    peers: Peers,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive.
    #[arg(long, default_value = "info", env = "COVET_LOG")]
    log_level: String,
    /// Size at which a log segment is closed and a new one started.
    #[arg(long, default_value_t = 64 << 20)]
    segment_bytes: u64,
    /// How often retention is enforced, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    retention_check_ms: u64,
    /// Most log segment files kept open at once, across all partitions
    /// (least recently used closed first). Default: a quarter of the
    /// open-file limit, at most 512, at least 16.
    #[arg(long)]
    max_open_segments: Option<usize>,
    /// Most client connections served at once; more are accepted and
    /// closed at once. Default: half the open-file limit, at most 10,000,
    /// at least 16.
    #[arg(long)]
    max_connections: Option<usize>,
}

pub async fn run(args: BrokerArgs, started: std::time::Instant) -> anyhow::Result<()> {
    tune_allocator();
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("bad --log-level '{}': {e}", args.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let fd_limit = raise_fd_limit();
    let max_open_segments = args
        .max_open_segments
        .unwrap_or_else(|| default_open_segments(fd_limit));
    covet_raft_store::set_max_open_files(max_open_segments);
    let max_connections = args
        .max_connections
        .unwrap_or_else(|| default_connections(fd_limit))
        .max(1);
    tracing::info!(
        max_open_segments = covet_raft_store::max_open_files(),
        max_connections,
        "descriptor budget"
    );
    if args.node_id == 0 {
        anyhow::bail!("--node-id must be at least 1");
    }
    if !args.peers.0.is_empty() {
        if !args.peers.0.contains_key(&args.node_id) {
            anyhow::bail!("--peers must include this node ({})", args.node_id);
        }
        if args.peer_listen.is_none() {
            anyhow::bail!("--peers needs --peer-listen");
        }
    }
    let config = BrokerConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        node_id: args.node_id,
        peer_listen: args.peer_listen,
        peers: args.peers.0,
        segment_bytes: args.segment_bytes.max(4096),
        retention_interval: Duration::from_millis(args.retention_check_ms.max(10)),
        max_connections,
        started,
    };
    server::run(config, shutdown_signal()).await
}

/// Resolves on SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() {
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

/// The segment cache's default size for an open-file limit: a quarter of
/// it (the rest is for connections, sled, and operations in flight, each
/// of which holds its segment open while it runs), between 16 and
/// raft-store's default.
fn default_open_segments(fd_limit: Option<libc::rlim_t>) -> usize {
    let default = covet_raft_store::DEFAULT_MAX_OPEN_FILES;
    fd_limit.map_or(default, |limit| {
        usize::try_from(limit / 4).map_or(default, |quarter| quarter.clamp(16, default))
    })
}

/// The default client connection limit for an open-file limit: half of
/// it (a quarter goes to segment files, the rest to sled, peers and
/// operations in flight), between 16 and 10,000.
fn default_connections(fd_limit: Option<libc::rlim_t>) -> usize {
    const MAX: usize = 10_000;
    fd_limit.map_or(MAX, |limit| {
        usize::try_from(limit / 2).map_or(MAX, |half| half.clamp(16, MAX))
    })
}

/// Raises the soft limit on open files to the hard limit and logs both;
/// returns the soft limit in force, if it can be read.
///
/// The soft limit is often 1,024 while the hard limit is far higher; a
/// broker holds a descriptor per client connection, per cached segment
/// file (bounded by raft-store's cache, see
/// [`covet_raft_store::set_max_open_files`]) and per sled file, so it takes
/// all it may. Failing to raise it is logged, not fatal: the broker runs
/// with what it has.
fn raise_fd_limit() -> Option<libc::rlim_t> {
    let (soft, hard) = match fd_limits() {
        Ok(limits) => limits,
        Err(err) => {
            tracing::warn!(%err, "cannot read the open-file limit");
            return None;
        }
    };
    if soft >= hard {
        tracing::info!(soft, hard, "open-file limit");
        return Some(soft);
    }
    if let Err(err) = set_fd_soft_limit(hard) {
        tracing::warn!(soft, hard, %err, "cannot raise the open-file limit");
        return Some(soft);
    }
    match fd_limits() {
        Ok((now, hard)) => {
            tracing::info!(
                soft = now,
                hard,
                was = soft,
                "open-file limit raised to the hard limit"
            );
            Some(now)
        }
        Err(err) => {
            tracing::warn!(%err, "cannot read the open-file limit");
            Some(soft)
        }
    }
}

/// `RLIMIT_NOFILE` as (soft, hard).
fn fd_limits() -> std::io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives
    // on this stack frame for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets the soft `RLIMIT_NOFILE` to `soft`, keeping the hard limit.
fn set_fd_soft_limit(soft: libc::rlim_t) -> std::io::Result<()> {
    let (_, hard) = fd_limits()?;
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `--peers`: node id → address peers dial.
#[derive(Debug, Clone, Default)]
struct Peers(std::collections::HashMap<u64, SocketAddr>);

fn parse_peers(s: &str) -> Result<Peers, String> {
    let mut peers = std::collections::HashMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("peer '{item}' is not ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| format!("peer id '{id}' is not a number"))?;
        if id == 0 {
            return Err("peer ids start at 1".into());
        }
        let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(|e| format!("peer address '{addr}': {e}"))?
            .next()
            .ok_or_else(|| format!("peer address '{addr}' resolves to nothing"))?;
        if peers.insert(id, addr).is_some() {
            return Err(format!("peer {id} given twice"));
        }
    }
    Ok(Peers(peers))
}
