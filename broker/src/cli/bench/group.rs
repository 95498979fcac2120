//! `covet bench group`: consumer-group consumption with every record
//! acknowledged on its own, beside a plain read of the same records.
//!
//! The topic is preloaded, read once from the start by a plain reader
//! (Covet's `Subscribe`, JetStream's pull consumer without acks), then
//! consumed by `--members` group members, each on its own connection as
//! separate processes would be, each acknowledging every record as soon
//! as it is handed out. On Covet the members join a consumer group, which
//! assigns them partitions; on JetStream they share one durable pull
//! consumer with explicit acks per stream, JetStream's way of sharing work.
//! `--max-in-flight` bounds unacknowledged records per partition (Covet's
//! `max_in_flight`) or per stream (JetStream's `max_ack_pending`). The group
//! clock starts once every member joined and the group settled; the time
//! that took is reported apart (`join_seconds`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use clap::Args;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::drive::{limit, preload, print, read_head, timed_read};
use super::stats::rates;
use super::{Backend, Common, Setup};

#[derive(Args, Debug)]
pub struct GroupArgs {
    #[command(flatten)]
    common: Common,
    /// Members sharing the topic, each on its own connection.
    #[arg(long, default_value_t = 1)]
    members: usize,
    /// Unacknowledged records per partition (Covet) or per stream
    /// (JetStream's `max_ack_pending`) at most.
    #[arg(long, default_value_t = 1000)]
    max_in_flight: u32,
    /// Preload in large batches instead of one record per batch.
    #[arg(long)]
    preload_batch: bool,
    /// Covet credit window per partition for the plain read, in records.
    #[arg(long, default_value_t = 20_000)]
    window: u64,
    /// JetStream: messages per pull request (at most `--max-in-flight`).
    #[arg(long, default_value_t = 10_000)]
    nats_batch: usize,
}

/// One handed-out record, already acknowledged: its partition (Covet) or
/// stream (JetStream) index and its offset or stream sequence. An error is
/// a partition's session ending (taken over in a rebalance, say); the
/// member goes on with the others, as `covet subscribe --group` does.
pub type HandledStream = BoxStream<'static, anyhow::Result<(u32, u64)>>;

/// One member: what it handles, and (Covet) how many partitions it holds.
pub struct Member {
    pub handled: HandledStream,
    /// `None` where members share every stream (JetStream).
    pub owned: Option<Box<dyn Fn() -> usize + Send + Sync>>,
}

/// What every member adds to.
struct Tally {
    /// Records handed out and acknowledged, counting redeliveries.
    handled: AtomicU64,
    /// Distinct records handled: a bit per offset, per partition (each
    /// member mostly touches its own partitions, so the locks are seldom
    /// contended; offsets are dense, so the bitmaps are small).
    seen: Vec<Mutex<Vec<u64>>>,
    distinct: AtomicU64,
    session_ends: AtomicU64,
    first_session_end: OnceLock<String>,
    /// When the first `target` distinct records had been handled.
    done_at: OnceLock<Instant>,
    done: Notify,
    target: u64,
}

impl Tally {
    fn count(&self, partition: u32, offset: u64) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        let Some(seen) = self.seen.get(partition as usize) else {
            return;
        };
        let (word, bit) = ((offset / 64) as usize, 1u64 << (offset % 64));
        {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() <= word {
                seen.resize(word + 1, 0);
            }
            if seen[word] & bit != 0 {
                return;
            }
            seen[word] |= bit;
        }
        let distinct = self.distinct.fetch_add(1, Ordering::Relaxed) + 1;
        if distinct >= self.target && self.done_at.set(Instant::now()).is_ok() {
            self.done.notify_one();
        }
    }

    fn session_ended(&self, e: anyhow::Error) {
        self.session_ends.fetch_add(1, Ordering::Relaxed);
        let _ = self.first_session_end.set(format!("{e:#}"));
    }
}

pub async fn group(a: GroupArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let mut setup = Setup::new(c);
    setup.window = a.window.max(1);
    setup.nats_batch = a.nats_batch.max(1);
    let members = a.members.max(1);
    let max_in_flight = a.max_in_flight.max(1);
    let (name, pre) = preload(c, &mut setup, a.preload_batch).await?;

    let reader = Backend::open(c.backend, &c.conn, &setup).await?;
    let plain = timed_read(&reader, pre.acked, limit(c.duration_s)).await?;
    drop(reader);
    let (plain_rate, _) = rates(plain.records, 0, plain.elapsed);

    // A group of its own for each run, so it starts at the beginning.
    let group = format!("bench-{}-{}", std::process::id(), covet_broker::now_ms());
    let tally = Arc::new(Tally {
        handled: AtomicU64::new(0),
        seen: (0..setup.partitions).map(|_| Mutex::default()).collect(),
        distinct: AtomicU64::new(0),
        session_ends: AtomicU64::new(0),
        first_session_end: OnceLock::new(),
        done_at: OnceLock::new(),
        done: Notify::new(),
        target: pre.acked,
    });
    // Every member joins, and the group settles (each partition with one
    // member, each member with its share), before the clock starts: the
    // figure is steady group consumption, and joining is reported apart.
    // Members take nothing meanwhile, so a moving partition is released at
    // once; what they fetched ahead is delivered again to its new owner.
    let joining = Instant::now();
    let mut joined = Vec::new();
    for member in 0..members {
        joined.push(
            Backend::group_member(c.backend, &c.conn, &setup, &group, member, max_in_flight)
                .await?,
        );
    }
    let settled = settle(&joined, setup.partitions, joining + limit(c.duration_s)).await;
    let join_seconds = joining.elapsed().as_secs_f64();
    let start = Instant::now();
    let stop_at = tokio::time::Instant::from_std(start + limit(c.duration_s));
    let mut tasks = JoinSet::new();
    for member in joined {
        tasks.spawn(consume(member.handled, tally.clone()));
    }
    let finished = loop {
        tokio::select! {
            _ = tally.done.notified() => break true,
            _ = tokio::time::sleep_until(stop_at) => break false,
            Some(ended) = tasks.join_next() => {
                // A member whose stream ended has nothing more to give; one
                // that failed ends the run.
                ended??;
            }
        }
    };
    tasks.abort_all();
    let elapsed = tally.done_at.get().copied().unwrap_or_else(Instant::now) - start;
    let handled = tally.handled.load(Ordering::Relaxed);
    let distinct = tally.distinct.load(Ordering::Relaxed);
    let redelivered = handled - distinct;
    let (group_rate, _) = rates(distinct, 0, elapsed);
    let consumer = match name {
        "covet" => format!("consumer group, {members} member(s), max_in_flight {max_in_flight} per partition, every record acked"),
        _ => format!(
            "durable pull consumer shared by {members} member(s), explicit acks, max_ack_pending {max_in_flight} per stream"
        ),
    };
    print(
        read_head("group", name, c, &setup, a.preload_batch, &pre),
        json!({
            "members": members,
            "consumer": consumer,
            "plain_records": plain.records,
            "plain_records_per_sec": plain_rate.round(),
            "records": distinct,
            "complete": finished,
            "redelivered": redelivered,
            "join_seconds": join_seconds,
            "settled": settled,
            "session_ends": tally.session_ends.load(Ordering::Relaxed),
            "first_session_end": tally.first_session_end.get(),
            "seconds": elapsed.as_secs_f64(),
            "records_per_sec": group_rate.round(),
            "share_of_plain": if plain_rate > 0.0 { (group_rate / plain_rate * 1000.0).round() / 1000.0 } else { 0.0 },
        }),
    );
    Ok(())
}

/// Waits until the members' partitions add up to `partitions` and each
/// member that can have one has one, or until `deadline`; whether they did.
async fn settle(members: &[Member], partitions: u32, deadline: Instant) -> bool {
    let owned: Vec<_> = members.iter().filter_map(|m| m.owned.as_ref()).collect();
    if owned.is_empty() {
        return true;
    }
    let each = usize::from(owned.len() <= partitions as usize);
    loop {
        let held: Vec<usize> = owned.iter().map(|f| f()).collect();
        if held.iter().sum::<usize>() == partitions as usize && held.iter().all(|&n| n >= each) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Counts what one member handles until its stream ends.
async fn consume(mut handled: HandledStream, tally: Arc<Tally>) -> anyhow::Result<()> {
    while let Some(record) = handled.next().await {
        match record {
            Ok((partition, offset)) => tally.count(partition, offset),
            Err(e) => tally.session_ended(e),
        }
    }
    Ok(())
}
