//! The loops of `covet bench pub` and `read` (and the open loop that
//! [`e2e`](super::e2e) publishes with), the same for every backend.
//!
//! A closed loop keeps a window of publishes outstanding and frees a slot
//! only when the oldest is acknowledged (like an application that awaits
//! its deliveries in turn); latency runs from the publish call to the
//! acknowledgement. An open loop publishes on an absolute schedule from a
//! thread of its own (`std::thread::sleep` is precise to tens of
//! microseconds where tokio's timer rounds to a millisecond) and takes
//! latency from each record's *intended* send time, so a broker that stalls
//! the sender pays for every record that should have gone out meanwhile.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::stats::{rates, Latency};
use super::{Backend, Common, PubArgs, ReadArgs, Setup};

/// Publishes outstanding at most in an open loop; beyond, the schedule slips
/// (and latency, taken from the schedule, shows it).
pub(super) const OPEN_LOOP_CAP: usize = 100_000;
/// The preload of `read` keeps this many publishes outstanding.
const PRELOAD_WINDOW: usize = 4096;
/// An open loop whose achieved rate is below this share of the offered one
/// is reported as overloaded.
const KEEPS_UP: f64 = 0.95;

/// What one publishing run saw.
pub(super) struct Run {
    sent: u64,
    pub(super) acked: u64,
    pub(super) errors: u64,
    first_error: Option<String>,
    start: Instant,
    /// When the last acknowledgement arrived.
    last: Instant,
    /// From each publish (or its intended send time) to its acknowledgement.
    pub(super) latency: Latency,
}

impl Run {
    fn new(start: Instant) -> Run {
        Run {
            sent: 0,
            acked: 0,
            errors: 0,
            first_error: None,
            start,
            last: start,
            latency: Latency::new(),
        }
    }

    /// Accounts for one outcome; `from` is the send (or intended send) time.
    fn settle(&mut self, from: Instant, outcome: anyhow::Result<()>, done: Instant) {
        match outcome {
            Ok(()) => {
                self.acked += 1;
                self.latency.record(done.saturating_duration_since(from));
                self.last = self.last.max(done);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.last.saturating_duration_since(self.start)
    }

    /// The figures every publishing benchmark prints.
    fn figures(&self, record_size: usize) -> Value {
        let (per_sec, mb) = rates(self.acked, record_size, self.elapsed());
        json!({
            "records": self.acked,
            "sent": self.sent,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.elapsed().as_secs_f64(),
            "records_per_sec": per_sec.round(),
            "mb_per_sec": (mb * 100.0).round() / 100.0,
            "latency_us": self.latency.to_json(),
        })
    }
}

pub(super) fn limit(duration_s: f64) -> Duration {
    Duration::from_secs_f64(duration_s.clamp(0.0, 24.0 * 3600.0))
}

pub(super) fn linger(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.clamp(0.0, 60_000.0) / 1000.0)
}

/// Merges `extra` into the JSON object `base` and prints it as one line.
pub(super) fn print(mut base: Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    println!("{base}");
}

pub async fn publish(a: PubArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut setup = Setup::new(c);
    setup.in_flight = a.in_flight.max(1);
    setup.linger = linger(a.linger_ms);
    let mut backend = Backend::open(c.backend, &c.conn, &setup).await?;
    let value = Bytes::from(vec![b'x'; c.record_size]);
    // One acknowledged publish per partition before the clock starts, on
    // either system: a new topic's leaders, the producer id and the
    // client's metadata are then in place, and the run measures steady
    // publishing rather than setup (which stalled a 10k/s open loop for
    // hundreds of milliseconds).
    for _ in 0..setup.partitions.max(1) {
        backend.publish(value.clone()).await?.await?;
    }
    let head = json!({
        "bench": "pub",
        "backend": backend.name(),
        "record_size": c.record_size,
        "in_flight": setup.in_flight,
        "linger_ms": a.linger_ms,
        "partitions": setup.partitions,
        "replication_factor": c.replication_factor,
        "rate": a.rate,
    });
    if a.rate == 0 {
        let run = closed_loop(
            &mut backend,
            &value,
            c.records,
            setup.in_flight,
            limit(c.duration_s),
            limit(c.drain_s),
        )
        .await?;
        print(head, run.figures(c.record_size));
        return Ok(());
    }
    let schedule = Schedule::new(a.rate, c.records, limit(c.duration_s), limit(c.drain_s));
    let (run, _) = open_loop(backend, schedule, move |_| value.clone()).await?;
    let mut figures = run.figures(c.record_size);
    figures["achieved_rate"] = json!(figures["records_per_sec"]);
    figures["overloaded"] = json!(schedule.overloaded(&run));
    print(head, figures);
    Ok(())
}

/// Keeps `window` publishes outstanding until `records` were sent or
/// `limit` passed, then waits for the rest.
async fn closed_loop(
    backend: &mut Backend,
    value: &Bytes,
    records: u64,
    window: usize,
    limit: Duration,
    drain: Duration,
) -> anyhow::Result<Run> {
    let start = Instant::now();
    let stop_at = start + limit;
    let mut run = Run::new(start);
    let mut pending = FuturesUnordered::new();
    let mut window = Window::new(window);
    loop {
        // Every acknowledgement already in is taken now, so each gets its
        // own completion time (an ordered queue would time later ones only
        // when they reach its head).
        while let Some(Some((seq, from, outcome, done))) = pending.next().now_or_never() {
            run.settle(from, outcome, done);
            window.settle(seq);
        }
        if run.sent >= records {
            break;
        }
        if window.full(run.sent) {
            match pending.next().await {
                Some((seq, from, outcome, done)) => {
                    run.settle(from, outcome, done);
                    window.settle(seq);
                }
                None => break,
            }
            continue;
        }
        let sent_at = Instant::now();
        if sent_at >= stop_at {
            break;
        }
        let ack = backend.publish(value.clone()).await?;
        let seq = run.sent;
        pending.push(async move {
            let outcome = ack.await;
            (seq, sent_at, outcome, Instant::now())
        });
        run.sent += 1;
    }
    let drain_until = tokio::time::Instant::now() + drain;
    while let Ok(Some((_, from, outcome, done))) =
        tokio::time::timeout_at(drain_until, pending.next()).await
    {
        run.settle(from, outcome, done);
    }
    Ok(run)
}

/// A window of outstanding publishes that frees a slot only when the
/// oldest is settled, as an application awaiting its deliveries in order
/// would.
struct Window {
    size: u64,
    /// Sequence number of the oldest unsettled publish.
    oldest: u64,
    /// Whether each publish from `oldest` on is settled.
    settled: VecDeque<bool>,
}

impl Window {
    fn new(size: usize) -> Window {
        Window {
            size: size.max(1) as u64,
            oldest: 0,
            settled: VecDeque::new(),
        }
    }

    /// Whether `sent` publishes so far leave no room for another.
    fn full(&self, sent: u64) -> bool {
        sent - self.oldest >= self.size
    }

    fn settle(&mut self, seq: u64) {
        let Some(i) = seq.checked_sub(self.oldest) else {
            return;
        };
        let i = i as usize;
        if self.settled.len() <= i {
            self.settled.resize(i + 1, false);
        }
        self.settled[i] = true;
        while self.settled.front() == Some(&true) {
            self.settled.pop_front();
            self.oldest += 1;
        }
    }
}

/// When each record of an open loop is due.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    rate: u64,
    records: u64,
    /// Publishing stops here even if the schedule slipped behind.
    limit: Duration,
    /// How long acknowledgements may take once publishing stopped.
    drain: Duration,
}

impl Schedule {
    /// `rate` per second, no more than `records` nor than fit in `limit`.
    pub(super) fn new(rate: u64, records: u64, limit: Duration, drain: Duration) -> Schedule {
        let rate = rate.max(1);
        let fit = (limit.as_secs_f64() * rate as f64) as u64;
        Schedule {
            rate,
            records: records.min(fit),
            limit,
            drain,
        }
    }

    fn due(&self, start: Instant, i: u64) -> Instant {
        start + Duration::from_secs_f64(i as f64 / self.rate as f64)
    }

    pub(super) fn overloaded(&self, run: &Run) -> bool {
        let (achieved, _) = rates(run.acked, 0, run.elapsed());
        run.acked < run.sent || achieved < KEEPS_UP * self.rate as f64
    }
}

/// Publishes on `schedule` from a thread of its own, each value made by
/// `value_for(intended send time)`; returns the run and the backend.
pub(super) async fn open_loop(
    mut backend: Backend,
    schedule: Schedule,
    value_for: impl Fn(Instant) -> Bytes + Send + 'static,
) -> anyhow::Result<(Run, Backend)> {
    tokio::task::spawn_blocking(move || {
        let handle = tokio::runtime::Handle::current();
        let start = Instant::now();
        let run = Arc::new(Mutex::new(Run::new(start)));
        let slots = Arc::new(Semaphore::new(OPEN_LOOP_CAP));
        let mut sent = 0;
        for i in 0..schedule.records {
            let due = schedule.due(start, i);
            let now = Instant::now();
            if now >= start + schedule.limit {
                break;
            }
            if due > now {
                std::thread::sleep(due - now);
            }
            let slot = handle.block_on(slots.clone().acquire_owned())?;
            let ack = handle.block_on(backend.publish(value_for(due)))?;
            sent += 1;
            let run = run.clone();
            handle.spawn(async move {
                let outcome = ack.await;
                let done = Instant::now();
                if let Ok(mut run) = run.lock() {
                    run.settle(due, outcome, done);
                }
                // Only after settling: the drain counts returned slots.
                drop(slot);
            });
        }
        // Every slot back means every acknowledgement settled.
        let all = u32::try_from(OPEN_LOOP_CAP).unwrap_or(u32::MAX);
        let _ = handle.block_on(tokio::time::timeout(
            schedule.drain,
            slots.acquire_many(all),
        ));
        let mut run = run
            .lock()
            .map_err(|_| anyhow::anyhow!("a settling task panicked"))?;
        run.sent = sent;
        let done = std::mem::replace(&mut *run, Run::new(start));
        Ok((done, backend))
    })
    .await?
}

pub async fn read(a: ReadArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut setup = Setup::new(c);
    setup.window = a.window.max(1);
    setup.nats_consumer = a.nats_consumer;
    setup.nats_batch = a.nats_batch.max(1);
    let (name, pre) = preload(c, &mut setup, a.preload_batch).await?;
    let (pre_rate, _) = rates(pre.acked, c.record_size, pre.elapsed());

    let reader = Backend::open(c.backend, &c.conn, &setup).await?;
    let read = timed_read(&reader, pre.acked, limit(c.duration_s)).await?;
    let (per_sec, _) = rates(read.records, 0, read.elapsed);
    print(
        read_head("read", name, c, &setup, a.preload_batch, &pre),
        json!({
            "preload_records_per_sec": pre_rate.round(),
            "consumer": consumer_name(name, &setup),
            "records": read.records,
            "complete": read.records == pre.acked,
            "seconds": read.elapsed.as_secs_f64(),
            "records_per_sec": per_sec.round(),
            "mb_per_sec": (read.bytes as f64 / read.elapsed.as_secs_f64().max(1e-9) / 1e4).round() / 100.0,
        }),
    );
    Ok(())
}

/// What the JSON line of a run that preloads and then reads starts with.
pub(super) fn read_head(
    bench: &str,
    backend: &str,
    c: &Common,
    setup: &Setup,
    big_batches: bool,
    pre: &Run,
) -> Value {
    json!({
        "bench": bench,
        "backend": backend,
        "record_size": c.record_size,
        "partitions": setup.partitions,
        "replication_factor": c.replication_factor,
        "preload": if big_batches { "large batches" } else { "one record per batch" },
        "preloaded": pre.acked,
        "preload_errors": pre.errors,
    })
}

/// Fills the topic with `records` records before a reading run: one record
/// per batch (the worst case for a reader: every record its own frame),
/// or in large batches. Returns the backend's name and what was
/// acknowledged.
pub(super) async fn preload(
    c: &Common,
    setup: &mut Setup,
    big_batches: bool,
) -> anyhow::Result<(&'static str, Run)> {
    setup.in_flight = PRELOAD_WINDOW;
    setup.one_record_batches = !big_batches;
    setup.big_batches = big_batches;
    let value = Bytes::from(vec![b'x'; c.record_size]);
    let mut loader = Backend::open(c.backend, &c.conn, setup).await?;
    let name = loader.name();
    let run = closed_loop(
        &mut loader,
        &value,
        c.records,
        PRELOAD_WINDOW,
        limit(c.duration_s),
        limit(c.drain_s),
    )
    .await?;
    Ok((name, run))
}

/// What a timed read from the start saw.
pub(super) struct Read {
    pub(super) records: u64,
    pub(super) bytes: u64,
    pub(super) elapsed: Duration,
}

/// Reads from the start of every partition until `expected` records came
/// or `limit` passed.
pub(super) async fn timed_read(
    reader: &Backend,
    expected: u64,
    limit: Duration,
) -> anyhow::Result<Read> {
    let start = Instant::now();
    let stop_at = tokio::time::Instant::from_std(start + limit);
    let mut values = reader.subscribe(true).await?;
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < expected {
        match tokio::time::timeout_at(stop_at, values.next()).await {
            Ok(Some(v)) => {
                bytes += v?.len() as u64;
                records += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(Read {
        records,
        bytes,
        elapsed: start.elapsed(),
    })
}

/// How the run reads, for the JSON line.
pub(super) fn consumer_name(backend: &str, setup: &Setup) -> String {
    match (backend, setup.nats_consumer) {
        ("covet", _) => format!("Subscription::next, window {}", setup.window),
        (_, super::NatsConsumer::Ordered) => "ordered consumer".to_string(),
        (_, super::NatsConsumer::Pull) => {
            format!("pull consumer, no acks, {} per batch", setup.nats_batch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_bounded_by_records_and_time() {
        let s = Schedule::new(10_000, 1_000_000, Duration::from_secs(3), Duration::ZERO);
        assert_eq!(s.records, 30_000);
        let s = Schedule::new(10_000, 500, Duration::from_secs(3), Duration::ZERO);
        assert_eq!(s.records, 500);
        let start = Instant::now();
        assert_eq!(s.due(start, 10_000) - start, Duration::from_secs(1));
    }

    #[test]
    fn the_window_frees_a_slot_only_when_the_oldest_settles() {
        let mut w = Window::new(3);
        assert!(!w.full(2));
        assert!(w.full(3));
        // Later publishes settling first free nothing.
        w.settle(2);
        w.settle(1);
        assert!(w.full(3));
        w.settle(0);
        assert!(!w.full(5));
        assert!(w.full(6));
    }

    #[test]
    fn a_run_that_falls_behind_is_overloaded() {
        let s = Schedule::new(1000, 1000, Duration::from_secs(1), Duration::ZERO);
        let start = Instant::now();
        let mut run = Run::new(start);
        run.sent = 1000;
        for i in 0..1000u64 {
            // Acknowledged at half the offered rate.
            let done = start + Duration::from_millis(2 * i + 2);
            run.settle(start, Ok(()), done);
        }
        assert!(s.overloaded(&run));
        let mut run = Run::new(start);
        run.sent = 1000;
        for i in 0..1000u64 {
            run.settle(start, Ok(()), start + Duration::from_millis(i + 1));
        }
        assert!(!s.overloaded(&run));
    }
}
