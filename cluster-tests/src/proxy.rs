//! A fault-injecting TCP proxy for one directed link between two nodes.
//!
//! In a test cluster every node reaches every other node through its own
//! proxy: node A's `--peers` entry for B names the listening address of the
//! proxy P(A→B), which forwards to B's real peer port. Raft traffic from A to
//! B travels on connections A dials, so the proxy on A→B carries exactly
//! A's messages to B (and the HTTP/2 frames B sends back on those
//! connections). A one-way partition is [`Mode::Drop`] on one proxy; a full
//! partition of a node is `Drop` on every proxy to and from it.
//!
//! Modes:
//! - [`Mode::Pass`] forwards bytes as they come.
//! - [`Mode::Drop`] resets every open connection at once (both directions,
//!   with an RST, not a FIN) and resets new ones as soon as they are
//!   accepted. A reset is what makes the dialing node notice fastest: its
//!   next read or write fails with `ECONNRESET`, gRPC reports the peer
//!   unavailable, and the node's reconnect backoff starts. A silent
//!   blackhole would leave it waiting for HTTP/2 keepalives instead; a long
//!   [`Mode::Delay`] comes close to that if a test wants it.
//! - [`Mode::Delay`] holds every chunk read for the given time before
//!   writing it on, preserving order.
//!
//! Memory is bounded: each direction of a connection holds at most
//! [`QUEUE_CHUNKS`] chunks of at most [`CHUNK_BYTES`]; when that queue is
//! full the proxy stops reading and TCP flow control pushes back on the
//! sender. Dropping the [`Proxy`] stops its listener and closes its
//! connections.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk read from one side before it is forwarded.
pub const CHUNK_BYTES: usize = 16 << 10;
/// Chunks queued per direction of a connection (so at most 1 MiB).
pub const QUEUE_CHUNKS: usize = 64;
/// How long the proxy waits to connect to its upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a proxy does with the traffic on its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Cut open connections and refuse new ones (accept, then reset).
    Drop,
    /// Forward everything after this delay.
    Delay(Duration),
}

/// The mode, and how many times the proxy was switched into `Drop`: a
/// connection opened before the latest switch is cut even if the mode has
/// already moved on.
#[derive(Debug, Clone, Copy)]
struct Control {
    mode: Mode,
    cuts: u64,
}

/// Counters a test can read.
#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    forwarded: AtomicU64,
    open: AtomicU64,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: watch::Sender<Control>,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks a free port) and forwards every
    /// accepted connection to `upstream`, starting in [`Mode::Pass`].
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (control, rx) = watch::channel(Control {
            mode: Mode::Pass,
            cuts: 0,
        });
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, upstream, rx, stats.clone()));
        Ok(Proxy {
            addr,
            upstream,
            control,
            stats,
            task,
        })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the mode; switching into `Drop` cuts open connections.
    pub fn set_mode(&self, mode: Mode) {
        self.control.send_modify(|c| {
            if mode == Mode::Drop && c.mode != Mode::Drop {
                c.cuts += 1;
            }
            c.mode = mode;
        });
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.control.borrow().mode
    }

    /// Connections accepted so far, including refused ones.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    /// Connections forwarded to the upstream so far.
    pub fn forwarded(&self) -> u64 {
        self.stats.forwarded.load(Ordering::Relaxed)
    }

    /// Connections being forwarded now.
    pub fn open_connections(&self) -> u64 {
        self.stats.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a `JoinSet`), so
        // aborting it closes every connection too.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: watch::Receiver<Control>,
    stats: Arc<Stats>,
) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(_) => {
                // Out of descriptors or a connection reset before accept:
                // back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let now = *control.borrow();
        if now.mode == Mode::Drop {
            reset(conn);
            continue;
        }
        connections.spawn(forward(
            conn,
            upstream,
            control.clone(),
            now.cuts,
            stats.clone(),
        ));
    }
}

/// Forwards one connection until both sides close, either side fails, or
/// the proxy is switched into `Drop`.
async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    cuts: u64,
    stats: Arc<Stats>,
) {
    let mut server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
    {
        Ok(Ok(s)) => s,
        // The upstream node is down: the dialer sees what it would see
        // without a proxy, a failed connection.
        _ => return reset(client),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    stats.open.fetch_add(1, Ordering::Relaxed);
    let clean = {
        let (cr, cw) = client.split();
        let (sr, sw) = server.split();
        let up = pump(cr, sw, control.clone());
        let down = pump(sr, cw, control.clone());
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(_) => break false,
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(_) => break false,
                },
                () = cut_after(&mut control, cuts) => break false,
            }
            if up_done && down_done {
                break true;
            }
        }
    };
    stats.open.fetch_sub(1, Ordering::Relaxed);
    if !clean {
        reset(client);
        reset(server);
    }
}

/// Resolves once the proxy has been switched into `Drop` more than `cuts`
/// times in all, or never if the proxy is gone.
async fn cut_after(control: &mut watch::Receiver<Control>, cuts: u64) {
    loop {
        if control.borrow_and_update().cuts > cuts {
            return;
        }
        if control.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Copies one direction: a reader queues chunks stamped with the time they
/// may leave, a writer sends them at that time. Ends with `Ok` when the
/// reading side closed and everything read was written (the writing side
/// is then shut down, passing the FIN on).
async fn pump<R, W>(mut from: R, mut to: W, control: watch::Receiver<Control>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(QUEUE_CHUNKS);
    let read = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let delay = match control.borrow().mode {
                Mode::Delay(d) => d,
                Mode::Pass | Mode::Drop => Duration::ZERO,
            };
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if tx.send((Instant::now() + delay, chunk)).await.is_err() {
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Closes a socket with an RST so the peer notices at once.
fn reset(stream: TcpStream) {
    // A zero linger makes close() send an RST and return immediately; the
    // deprecation warns about non-zero lingers blocking the thread.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}
