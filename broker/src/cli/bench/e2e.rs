//! `covet bench e2e`: publish→deliver latency. A subscriber follows the
//! tail while the open loop of [`drive`](super::drive) publishes at a set
//! rate; each value carries its intended send time, and latency is
//! delivery time minus that, so it is corrected for coordinated omission
//! like the open loop's acknowledgement latency.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::oneshot;

use super::drive::{consumer_name, limit, linger, open_loop, Schedule, OPEN_LOOP_CAP};
use super::stats::{rates, Latency};
use super::{Backend, E2eArgs, Setup};

/// The value of the first record, sent before timing starts: when the
/// subscriber sees it, it is positioned on the tail.
const MARKER: u64 = u64::MAX;

/// An e2e record's value: its intended send time, in nanoseconds since the
/// run's epoch, then filler up to `size`.
fn stamped(epoch: Instant, at: Option<Instant>, size: usize) -> Bytes {
    let nanos = at.map_or(MARKER, |t| {
        u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(MARKER - 1)
    });
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64_le(nanos);
    b.resize(size.max(8), b'x');
    b.freeze()
}

fn stamp_of(value: &[u8]) -> Option<u64> {
    let head: [u8; 8] = value.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

/// What the subscriber of an e2e run saw.
struct Delivered {
    count: u64,
    latency: Latency,
}

pub async fn e2e(a: E2eArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut setup = Setup::new(c);
    setup.linger = linger(a.linger_ms);
    setup.in_flight = OPEN_LOOP_CAP;
    setup.window = a.window.max(1);
    let mut backend = Backend::open(c.backend, &c.conn, &setup).await?;
    let name = backend.name();
    let epoch = Instant::now();
    let values = backend.subscribe(false).await?;
    let issued = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let (positioned_tx, positioned) = oneshot::channel();
    let hard_stop = epoch + limit(c.duration_s) + limit(c.drain_s) + Duration::from_secs(2);
    let subscriber = tokio::spawn(follow(
        values,
        epoch,
        issued.clone(),
        finished.clone(),
        positioned_tx,
        hard_stop,
    ));

    // The marker is re-sent until the subscriber sees one: only then is it
    // known to be reading from the tail.
    let positioned_by = tokio::time::Instant::now() + Duration::from_secs(10);
    tokio::pin!(positioned);
    loop {
        backend
            .publish(stamped(epoch, None, c.record_size))
            .await?
            .await?;
        let wait = tokio::time::Instant::now() + Duration::from_millis(200);
        if tokio::time::timeout_at(wait.min(positioned_by), &mut positioned)
            .await
            .is_ok()
        {
            break;
        }
        if tokio::time::Instant::now() >= positioned_by {
            anyhow::bail!("the subscriber did not see a record published on the tail within 10 s");
        }
    }

    let schedule = Schedule::new(a.rate, c.records, limit(c.duration_s), limit(c.drain_s));
    let size = c.record_size;
    let (run, backend) = open_loop(backend, schedule, move |due| {
        stamped(epoch, Some(due), size)
    })
    .await?;
    issued.store(run.acked, Ordering::SeqCst);
    finished.store(true, Ordering::SeqCst);
    let delivered = subscriber.await??;
    drop(backend);
    let (achieved, _) = rates(run.acked, 0, run.elapsed());
    println!(
        "{}",
        json!({
            "bench": "e2e",
            "backend": name,
            "record_size": size.max(8),
            "partitions": setup.partitions,
            "replication_factor": c.replication_factor,
            "linger_ms": a.linger_ms,
            "consumer": consumer_name(name, &setup),
            "rate": a.rate,
            "achieved_rate": achieved.round(),
            "overloaded": schedule.overloaded(&run),
            "records": run.acked,
            "delivered": delivered.count,
            "publish_errors": run.errors,
            "latency_us": delivered.latency.to_json(),
            "ack_latency_us": run.latency.to_json(),
        })
    );
    Ok(())
}

/// Reads the tail until every acknowledged record arrived (or, once
/// publishing finished, nothing came for a second), recording
/// publish→deliver latency from each record's intended send time.
async fn follow(
    mut values: super::ValueStream,
    epoch: Instant,
    issued: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    positioned: oneshot::Sender<()>,
    hard_stop: Instant,
) -> anyhow::Result<Delivered> {
    let mut positioned = Some(positioned);
    let mut out = Delivered {
        count: 0,
        latency: Latency::new(),
    };
    let mut quiet = 0;
    loop {
        if finished.load(Ordering::SeqCst) && out.count >= issued.load(Ordering::SeqCst) {
            break;
        }
        if Instant::now() >= hard_stop || quiet >= 5 {
            break;
        }
        let next = tokio::time::timeout(Duration::from_millis(200), values.next()).await;
        let value = match next {
            Ok(Some(v)) => v?,
            Ok(None) => break,
            Err(_) => {
                if finished.load(Ordering::SeqCst) {
                    quiet += 1;
                }
                continue;
            }
        };
        let now = Instant::now();
        quiet = 0;
        match stamp_of(&value) {
            Some(MARKER) => {
                if let Some(tx) = positioned.take() {
                    let _ = tx.send(());
                }
            }
            Some(nanos) => {
                out.count += 1;
                let sent = epoch + Duration::from_nanos(nanos);
                out.latency.record(now.saturating_duration_since(sent));
            }
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_markers_are_distinct() {
        let epoch = Instant::now();
        let at = epoch + Duration::from_micros(1234);
        let v = stamped(epoch, Some(at), 128);
        assert_eq!(v.len(), 128);
        assert_eq!(stamp_of(&v), Some(1_234_000));
        assert_eq!(stamp_of(&stamped(epoch, None, 4)), Some(MARKER));
        assert_eq!(stamp_of(b"short"), None);
    }
}
