//! What each route has done, for `covet bridge status` (and later the
//! metrics endpoint): counters the route updates as it goes, a rate
//! sampled once a second, and a small HTTP endpoint serving them as JSON
//! at `GET /status`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One route's counters. Routes update them; readers take a [`RouteReport`].
#[derive(Debug, Default)]
pub struct RouteStatus {
    pub name: String,
    /// `nats -> covet` or `covet -> nats`, with the two ends.
    pub description: String,
    /// Messages taken from the source.
    pub received: AtomicU64,
    /// Messages the target acknowledged (and then acknowledged at the source).
    pub delivered: AtomicU64,
    /// Redelivered messages found already written and skipped.
    pub duplicates_skipped: AtomicU64,
    /// Messages the target refused, written to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Failures met (a side down, a write retried); the route carries on.
    pub errors: AtomicU64,
    /// Messages taken and not yet settled.
    pub in_flight: AtomicU64,
    /// Messages waiting at the source (JetStream consumer pending, or the
    /// Covet group's lag), as last asked.
    pub lag: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// (when, delivered) once a second, for the rate.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// A route's state as `GET /status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouteReport {
    pub name: String,
    pub description: String,
    pub received: u64,
    pub delivered: u64,
    pub duplicates_skipped: u64,
    pub dead_lettered: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub lag: u64,
    /// Messages delivered per second over the last few seconds.
    pub rate: f64,
    pub last_error: Option<String>,
}

/// How many one-second samples the rate spans.
const RATE_WINDOW: usize = 5;

impl RouteStatus {
    pub fn new(name: &str, description: String) -> Arc<RouteStatus> {
        Arc::new(RouteStatus {
            name: name.to_string(),
            description,
            ..Default::default()
        })
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a failure and keeps its message.
    pub fn error(&self, e: &dyn std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    fn sample(&self) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((Instant::now(), self.delivered.load(Ordering::Relaxed)));
        while s.len() > RATE_WINDOW + 1 {
            s.pop_front();
        }
    }

    pub fn report(&self) -> RouteReport {
        let rate = {
            let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            match (s.front(), s.back()) {
                (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
                _ => 0.0,
            }
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RouteReport {
            name: self.name.clone(),
            description: self.description.clone(),
            received: get(&self.received),
            delivered: get(&self.delivered),
            duplicates_skipped: get(&self.duplicates_skipped),
            dead_lettered: get(&self.dead_lettered),
            errors: get(&self.errors),
            in_flight: get(&self.in_flight),
            lag: get(&self.lag),
            rate,
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Samples every route's rate once a second, for as long as it runs.
pub async fn sample(routes: Vec<Arc<RouteStatus>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for r in &routes {
            r.sample();
        }
    }
}

/// Largest request the endpoint reads; status requests are one line.
const MAX_REQUEST: usize = 8 << 10;

/// Serves `GET /status` (JSON: a list of [`RouteReport`]) and
/// `GET /healthz` on `listener` until dropped.
pub async fn serve(listener: TcpListener, routes: Vec<Arc<RouteStatus>>) {
    let routes = Arc::new(routes);
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(512);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 512];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
                    let n = sock.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
            let (code, body) = match line {
                b"GET /status HTTP/1.1" | b"GET /status HTTP/1.0" => {
                    let reports: Vec<RouteReport> = routes.iter().map(|r| r.report()).collect();
                    (
                        "200 OK",
                        serde_json::to_string(&reports).unwrap_or_default(),
                    )
                }
                b"GET /healthz HTTP/1.1" | b"GET /healthz HTTP/1.0" => ("200 OK", "ok".to_string()),
                _ => ("404 Not Found", "not found".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Asks a running bridge's endpoint for its routes.
pub async fn fetch(addr: &str) -> anyhow::Result<Vec<RouteReport>> {
    use anyhow::Context as _;
    let mut sock =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .with_context(|| {
                format!("connecting to the bridge's status endpoint {addr}: timed out")
            })?
            .with_context(|| format!("connecting to the bridge's status endpoint {addr}"))?;
    sock.write_all(format!("GET /status HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut resp))
        .await
        .context("reading the bridge's status: timed out")??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the bridge's status endpoint sent no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "the bridge's status endpoint answered {:?}",
            head.lines().next().unwrap_or("")
        );
    }
    serde_json::from_str(body).context("the bridge's status is not the JSON expected")
}
