//! The fault-injecting proxy against a local echo server: bytes pass
//! through unchanged, `Drop` cuts open connections and refuses new ones,
//! `Delay` delays, and dropping the proxy closes everything.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covet_cluster_tests::{Mode, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on anything these tests wait for.
const WAIT: Duration = Duration::from_secs(5);

/// An echo server; counts the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

async fn proxy_to_echo() -> (Proxy, Arc<AtomicUsize>) {
    let (echo, accepted) = echo_server().await;
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    (
        Proxy::start(any, echo).await.expect("start proxy"),
        accepted,
    )
}

/// Sends `msg` and reads the echo back.
async fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    conn.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, conn.read_exact(&mut back))
        .await
        .expect("echo within the deadline")
        .expect("read echo");
    back
}

/// Waits until the connection is closed (EOF or an error such as a reset).
async fn assert_closed(conn: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let outcome = tokio::time::timeout(WAIT, conn.read(&mut buf))
        .await
        .expect("connection closed within the deadline");
    assert!(
        matches!(outcome, Ok(0) | Err(_)),
        "expected a closed connection, read {outcome:?}"
    );
}

#[tokio::test]
async fn pass_forwards_bytes_both_ways_and_half_closes() {
    let (proxy, accepted) = proxy_to_echo().await;
    assert_eq!(proxy.mode(), Mode::Pass);
    let mut conn = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    // Larger than the proxy's queues, so flow control is exercised.
    let payload: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let (mut r, mut w) = conn.split();
    let write = async {
        w.write_all(&payload).await.expect("write payload");
        w.shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("read echo to EOF");
        back
    };
    let ((), back) = tokio::time::timeout(WAIT * 4, async { tokio::join!(write, read) })
        .await
        .expect("echo of 3 MiB within the deadline");
    assert!(
        back == payload,
        "echoed bytes differ ({} bytes back)",
        back.len()
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.forwarded(), 1);
}

#[tokio::test]
async fn drop_cuts_open_connections_and_refuses_new_ones() {
    let (proxy, accepted) = proxy_to_echo().await;
    let mut conn = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    assert_eq!(round_trip(&mut conn, b"hello").await, b"hello");

    proxy.set_mode(Mode::Drop);
    assert_closed(&mut conn).await;

    // A new connection is accepted, then reset; it never reaches upstream.
    let before = accepted.load(Ordering::SeqCst);
    let mut refused = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    assert_closed(&mut refused).await;
    assert_eq!(accepted.load(Ordering::SeqCst), before);

    proxy.set_mode(Mode::Pass);
    let mut healed = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    assert_eq!(round_trip(&mut healed, b"again").await, b"again");
}

#[tokio::test]
async fn a_brief_drop_still_cuts_connections_opened_before_it() {
    let (proxy, _) = proxy_to_echo().await;
    let mut conn = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    assert_eq!(round_trip(&mut conn, b"x").await, b"x");
    proxy.set_mode(Mode::Drop);
    proxy.set_mode(Mode::Pass);
    assert_closed(&mut conn).await;
}

#[tokio::test]
async fn delay_holds_each_direction_for_the_delay() {
    let (proxy, _) = proxy_to_echo().await;
    let mut conn = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    let start = Instant::now();
    round_trip(&mut conn, b"warm").await;
    let fast = start.elapsed();

    let delay = Duration::from_millis(300);
    proxy.set_mode(Mode::Delay(delay));
    let start = Instant::now();
    assert_eq!(round_trip(&mut conn, b"slow").await, b"slow");
    let slow = start.elapsed();
    // Request and echo are each held for the delay.
    assert!(
        slow >= 2 * delay,
        "round trip took {slow:?}, expected >= {:?}",
        2 * delay
    );
    assert!(slow > fast, "delayed {slow:?} vs passed {fast:?}");

    proxy.set_mode(Mode::Pass);
    let start = Instant::now();
    round_trip(&mut conn, b"fast").await;
    assert!(start.elapsed() < slow, "Pass after Delay is still delayed");
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections_and_listener() {
    let (proxy, _) = proxy_to_echo().await;
    let addr = proxy.local_addr();
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut conn, b"hi").await, b"hi");
    drop(proxy);
    assert_closed(&mut conn).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a dropped proxy still accepts connections"
    );
}

#[tokio::test]
async fn upstream_down_means_the_dialer_sees_a_failure() {
    // Nothing listens on the upstream port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let upstream = dead.local_addr().expect("addr");
    drop(dead);
    let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), upstream)
        .await
        .expect("start proxy");
    let mut conn = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    assert_closed(&mut conn).await;
    assert_eq!(proxy.forwarded(), 0);
}
