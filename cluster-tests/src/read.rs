//! Reading a partition from its start up to an offset, through the client,
//! from its leader or from one replica, reopening after failures until a
//! deadline.

use std::time::Duration;

use covet_client::{Client, ConsumedRecord, PartitionStream, Reason, StartPosition};
use tokio::time::Instant;

use crate::cluster::NodeId;
use crate::CLIENT_CALL_TIMEOUT;

/// Records granted to the broker at a time.
const CREDIT: u64 = 2_000;
/// A stream that delivers nothing for this long is reopened.
const IDLE: Duration = Duration::from_secs(3);
/// Pause before reopening after a failure.
const RETRY: Duration = Duration::from_millis(200);

/// Whom to read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The partition's leader, wherever it is (`open_partition`).
    Leader,
    /// This node, leader or not (`open_replica`).
    Replica(NodeId),
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// Everything up to the target was read.
    Complete,
    /// The deadline passed first; the records are what was read.
    TimedOut,
    /// A replica refused with `NOT_LEADER` (follower reads not served).
    NotLeader,
}

/// What [`read_partition`] read.
#[derive(Debug, Clone)]
pub struct PartitionRead {
    pub records: Vec<ConsumedRecord>,
    pub end: ReadEnd,
    /// The offset the read went up to: the larger of `until` and the high
    /// watermark when the stream first opened.
    pub target: u64,
    /// The last error seen, if any.
    pub last_error: Option<String>,
}

/// Reads `topic`/`partition` from its earliest record up to at least
/// `until` and at least the high watermark reported when the stream
/// first opens. Failures are retried until `deadline`, resuming after the
/// last record read; a replica's `NOT_LEADER` ends the read at once.
pub async fn read_partition(
    client: &Client,
    source: Source,
    topic: &str,
    partition: u32,
    until: u64,
    deadline: Instant,
) -> PartitionRead {
    let mut out = PartitionRead {
        records: Vec::new(),
        end: ReadEnd::TimedOut,
        target: until,
        last_error: None,
    };
    let mut opened_once = false;
    while Instant::now() < deadline {
        let next = out.records.last().map_or(0, |r| r.offset + 1);
        let wait = CLIENT_CALL_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let opened = tokio::time::timeout(wait, open(client, source, topic, partition, next)).await;
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let refused = e.reason() == Some(Reason::NotLeader);
                out.last_error = Some(e.to_string());
                if refused && matches!(source, Source::Replica(_)) {
                    out.end = ReadEnd::NotLeader;
                    return out;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(_) => {
                out.last_error = Some("opening the stream timed out".into());
                continue;
            }
        };
        if !opened_once {
            opened_once = true;
            out.target = out.target.max(stream.high_watermark());
        }
        if follow(&mut stream, &mut out, deadline).await {
            out.end = ReadEnd::Complete;
            return out;
        }
    }
    out
}

async fn open(
    client: &Client,
    source: Source,
    topic: &str,
    partition: u32,
    next: u64,
) -> covet_client::Result<PartitionStream> {
    let from = if next == 0 {
        StartPosition::Earliest
    } else {
        StartPosition::Offset(next)
    };
    match source {
        Source::Leader => client.open_partition(topic, partition, from, CREDIT).await,
        Source::Replica(node) => {
            client
                .open_replica(node, topic, partition, from, CREDIT)
                .await
        }
    }
}

/// Reads batches into `out` until the target is reached (`true`), or the
/// stream fails, idles or outlives the deadline (`false`).
async fn follow(stream: &mut PartitionStream, out: &mut PartitionRead, deadline: Instant) -> bool {
    loop {
        if stream.position() >= out.target {
            return true;
        }
        let wait = IDLE.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, stream.next_batch()).await {
            Ok(Ok(Some(records))) => {
                let n = records.len() as u64;
                out.records.extend(records);
                if let Err(e) = stream.grant(n).await {
                    out.last_error = Some(e.to_string());
                    return false;
                }
            }
            Ok(Ok(None)) => return false,
            Ok(Err(e)) => {
                out.last_error = Some(e.to_string());
                return false;
            }
            Err(_) => return false,
        }
    }
}
