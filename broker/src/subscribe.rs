//! A subscribe session: pushes one partition's committed batches to a
//! client while it holds credit, and tails new commits without polling.
//!
//! Credit is counted in records. The broker sends a whole batch while the
//! credit is positive and subtracts the records it carries past the
//! client's position, so a client is never sent more than its credit plus
//! one batch. A slow consumer stops granting credit, the session stops
//! reading the log, and the backlog stays on disk.
//!
//! The cost of a read is per message, not per batch: one blocking read
//! looks up to 8192 batches in the offset index and reads them from the
//! log with one `pread` per segment, and consecutive batches travel
//! together in one `Batches` message of up to 1 MiB (their bytes as
//! stored, never re-encoded). A partition written one record per batch
//! thus costs one task hand-off and one HTTP/2 frame per few thousand
//! records, not per record.

use covet_protocol::api::{position, subscribe_request, subscribe_response, Batches, Opened};
use covet_protocol::api::{SubscribeOpen, SubscribeRequest, SubscribeResponse};
use covet_protocol::batch;
use futures::Stream;
use raft::prelude::Entry;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::catalog::{LocalReplica, PartitionHandle};
use crate::error::{BrokerError, Result};
use crate::state::partition::{BatchLocation, OffsetIndex};
use covet_raft_store::GroupStorage;

/// Batches looked up in the offset index per read, at most: 384 KiB of
/// index entries, about a [`MESSAGE_BYTES`] message of one-record batches.
/// A read also looks up no more batches than the session has credit for,
/// since each costs at least one record of credit.
const BATCHES_PER_READ: usize = 8192;
/// Bytes of log read per read.
const BYTES_PER_READ: u64 = 4 << 20;
/// Bytes of batches per response message: enough that the per-message
/// costs (a channel hand-off, an HTTP/2 frame, a client wake-up) vanish
/// behind the records, small enough to stay far below the 65 MiB message
/// limit and to interleave with other streams on the connection. A batch
/// larger than this travels alone.
const MESSAGE_BYTES: usize = 1 << 20;

pub struct Session {
    topic: String,
    replica: LocalReplica,
    /// This node's id, and whether reading while not leading is allowed.
    me: u64,
    allow_follower: bool,
    inbound: Streaming<SubscribeRequest>,
    shutdown: watch::Receiver<bool>,
    /// Next offset to deliver.
    next: u64,
    credit: i64,
    opened: Opened,
}

impl Session {
    /// Resolves the starting position; errors (e.g. past the end) fail the
    /// call before any stream is set up.
    pub async fn open(
        partition: &PartitionHandle,
        me: u64,
        open: &SubscribeOpen,
        inbound: Streaming<SubscribeRequest>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Session> {
        let replica = if open.allow_follower {
            partition.local()?
        } else {
            partition.leading(me)?
        }
        .clone();
        let progress = *replica.progress.borrow();
        let (start, end) = (progress.start_offset, progress.high_watermark);
        let next = match open.from.as_ref().and_then(|p| p.kind.as_ref()) {
            Some(position::Kind::Earliest(_)) => start,
            Some(position::Kind::Latest(_)) | None => end,
            Some(position::Kind::Offset(o)) if *o > end => {
                return Err(BrokerError::OffsetOutOfRange {
                    requested: *o,
                    start,
                    end,
                });
            }
            Some(position::Kind::Offset(o)) => (*o).max(start),
            Some(position::Kind::TimestampMs(ts)) => {
                let (index, ts) = (replica.index.clone(), *ts);
                blocking(move || index.offset_for_time(ts))
                    .await
                    .map_err(|s| BrokerError::Internal(s.message().to_string()))??
                    .unwrap_or(end)
                    .clamp(start, end)
            }
        };
        let opened = Opened {
            partition: partition.partition,
            offset: next,
            start_offset: start,
            high_watermark: end,
        };
        let credit = i64::try_from(open.credit).unwrap_or(i64::MAX);
        Ok(Session {
            topic: open.topic.clone(),
            replica,
            me,
            allow_follower: open.allow_follower,
            inbound,
            shutdown,
            next,
            credit,
            opened,
        })
    }

    /// Runs the session on its own task; the returned stream is the
    /// response side of the call.
    pub fn spawn(self) -> impl Stream<Item = std::result::Result<SubscribeResponse, Status>> {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            if let Err(status) = self.run(&tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        ReceiverStream::new(rx)
    }

    async fn run(
        mut self,
        tx: &mpsc::Sender<std::result::Result<SubscribeResponse, Status>>,
    ) -> std::result::Result<(), Status> {
        let opened = SubscribeResponse {
            kind: Some(subscribe_response::Kind::Opened(self.opened)),
        };
        if tx.send(Ok(opened)).await.is_err() {
            return Ok(());
        }
        let mut progress = self.replica.progress.clone();
        let mut leader = self.replica.leader.clone();
        // Set when the entries we looked up were trimmed away: wait for the
        // trim to publish the new start offset instead of spinning.
        let mut stale = false;
        loop {
            let p = *progress.borrow_and_update();
            self.next = self.next.max(p.start_offset);
            if self.credit > 0 && self.next < p.high_watermark && !stale {
                match self.send_some(tx).await? {
                    Flow::Sent => continue,
                    Flow::Stale => stale = true,
                    Flow::Gone => return Ok(()),
                }
            }
            tokio::select! {
                msg = self.inbound.message() => match msg {
                    Ok(Some(SubscribeRequest { kind: Some(subscribe_request::Kind::Credit(n)) })) => {
                        self.credit = self.credit.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    Ok(Some(_)) => {
                        return Err(BrokerError::InvalidRequest("only credit may follow open".into()).to_status());
                    }
                    Ok(None) => return Ok(()),
                    // Say why the stream ends rather than ending it as if
                    // the client had closed it.
                    Err(status) => return Err(BrokerError::from_inbound(&status).to_status()),
                },
                // Watched even without credit, so a deleted topic ends the
                // stream at once.
                changed = progress.changed() => {
                    if changed.is_err() {
                        return Err(BrokerError::UnknownTopic(self.topic.clone()).to_status());
                    }
                    stale = false;
                }
                // A deposed leader stops serving as soon as it learns of
                // the new term, so a client moves to the new leader.
                _ = leader.changed(), if !self.allow_follower => {
                    let (now, _) = *leader.borrow_and_update();
                    if now != self.me {
                        return Err(BrokerError::NotLeader { leader_hint: now }.to_status());
                    }
                }
                _ = self.shutdown.changed() => return Err(BrokerError::ShuttingDown.to_status()),
                _ = tx.closed() => return Ok(()),
            }
        }
    }

    /// Reads batches from `self.next` and sends them, coalesced into
    /// messages of up to [`MESSAGE_BYTES`], while credit lasts.
    async fn send_some(
        &mut self,
        tx: &mpsc::Sender<std::result::Result<SubscribeResponse, Status>>,
    ) -> std::result::Result<Flow, Status> {
        let (index, storage, next) = (
            self.replica.index.clone(),
            self.replica.storage.clone(),
            self.next,
        );
        let limit = usize::try_from(self.credit)
            .unwrap_or(usize::MAX)
            .clamp(1, BATCHES_PER_READ);
        let read = blocking(move || read_batches(&index, &storage, next, limit)).await??;
        let Read::Found(entries, locations) = read else {
            return Ok(Flow::Stale);
        };
        let mut message = Vec::new();
        let mut bytes = 0;
        for (entry, loc) in matching(&entries, &locations) {
            let end = loc.base_offset + u64::from(loc.record_count);
            if end <= self.next {
                continue;
            }
            debug_assert!(
                batch::read_header(&entry.data).map(|h| h.base_offset) == Ok(loc.base_offset)
            );
            if !message.is_empty() && bytes + entry.data.len() > MESSAGE_BYTES {
                if !self.send(tx, std::mem::take(&mut message)).await {
                    return Ok(Flow::Gone);
                }
                bytes = 0;
            }
            bytes += entry.data.len();
            message.push(entry.data.clone());
            self.credit -= i64::try_from(end - self.next).unwrap_or(i64::MAX);
            self.next = end;
            if self.credit <= 0 {
                break;
            }
        }
        if !message.is_empty() && !self.send(tx, message).await {
            return Ok(Flow::Gone);
        }
        Ok(Flow::Sent)
    }

    /// Sends `batches`, which end at `self.next`, as one message; false if
    /// the client went away.
    async fn send(
        &self,
        tx: &mpsc::Sender<std::result::Result<SubscribeResponse, Status>>,
        batches: Vec<bytes::Bytes>,
    ) -> bool {
        let high_watermark = self.replica.progress.borrow().high_watermark;
        let msg = Batches {
            batches,
            high_watermark: high_watermark.max(self.next),
        };
        let resp = SubscribeResponse {
            kind: Some(subscribe_response::Kind::Batches(msg)),
        };
        tx.send(Ok(resp)).await.is_ok()
    }
}

/// What one read of the log found.
pub(crate) enum Read {
    /// Entries from `next` on, and the index locations that name them.
    Found(Vec<Entry>, Vec<BatchLocation>),
    /// Retention removed the entries while we looked them up; the next
    /// pass starts from the new start offset.
    Stale,
}

/// Looks up `limit` batches from offset `next` in the offset index and
/// reads them from the log (up to [`BYTES_PER_READ`]): blocking I/O, run
/// by [`blocking`].
pub(crate) fn read_batches(
    index: &OffsetIndex,
    storage: &GroupStorage,
    next: u64,
    limit: usize,
) -> Result<Read> {
    read_batches_through(index, storage, next, u64::MAX, limit)
}

/// [`read_batches`], reading no batch that starts after offset `through`:
/// a group session that needs a few records of one large batch reads that
/// batch, not the next few megabytes as well.
pub(crate) fn read_batches_through(
    index: &OffsetIndex,
    storage: &GroupStorage,
    next: u64,
    through: u64,
    limit: usize,
) -> Result<Read> {
    let mut locations = index.batches_from(next, limit)?;
    // The first is always read: it holds `next`.
    let keep = 1 + locations
        .iter()
        .skip(1)
        .take_while(|l| l.base_offset <= through)
        .count();
    locations.truncate(keep);
    let (Some(first), Some(last)) = (locations.first(), locations.last()) else {
        return Err(BrokerError::Internal(format!(
            "offset {next} is committed but not indexed"
        )));
    };
    match storage.read(first.raft_index, last.raft_index + 1, BYTES_PER_READ) {
        Ok(entries) => Ok(Read::Found(entries, locations)),
        Err(covet_raft_store::StoreError::Compacted { .. }) => Ok(Read::Stale),
        Err(e) => Err(BrokerError::from(e)),
    }
}

/// Log reads running at once, over all sessions. Each may hold up to
/// [`BYTES_PER_READ`] of entries; the bound keeps many subscribers from
/// filling tokio's blocking pool (512 threads) and memory at once.
static LOG_READS: Semaphore = Semaphore::const_new(16);

/// Runs `read` (index lookups, `pread` of up to 4 MiB) on tokio's blocking
/// pool, so a slow disk stalls the sessions waiting on it, never the
/// runtime's workers that serve every other client.
pub(crate) async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::result::Result<Result<T>, Status> {
    let _turn = LOG_READS
        .acquire()
        .await
        .map_err(|_| BrokerError::ShuttingDown.to_status())?;
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| BrokerError::Internal(format!("log read task failed: {e}")).to_status())
}

/// What a send pass ended with.
enum Flow {
    /// Sent what credit allowed (or what was there).
    Sent,
    /// The entries were trimmed by retention before they could be read.
    Stale,
    /// The client went away.
    Gone,
}

/// Pairs the entries read with the index locations that name them; entries
/// the state machine rejected (no location) are skipped.
pub(crate) fn matching<'a>(
    entries: &'a [Entry],
    locations: &'a [BatchLocation],
) -> impl Iterator<Item = (&'a Entry, &'a BatchLocation)> {
    let mut locs = locations.iter().peekable();
    entries.iter().filter_map(move |e| {
        while locs.peek().is_some_and(|l| l.raft_index < e.index) {
            locs.next();
        }
        match locs.peek() {
            Some(l) if l.raft_index == e.index => locs.next().map(|l| (e, l)),
            _ => None,
        }
    })
}
