//! The partition state machine: offsets, and the lookups that let readers
//! find a record in the Raft log.
//!
//! The Raft log *is* the partition log. Applying a committed entry does not
//! copy the batch anywhere; it checks that the base offset the leader stamped
//! is the next offset, advances the high watermark, and appends to the
//! partition's offset index ([`crate::state::offsets`]) where the batch
//! lives, so readers find the entry holding any offset with a binary search,
//! and entries the state machine rejected are never served.
//!
//! The rest of the applied state lives in the partition's sled tree,
//! written at *checkpoints* (every [`CHECKPOINT_EVERY`] or so, and when
//! stopping), never on the produce path:
//!
//! - `q` + producer id → the idempotent-producer dedup entry
//!   ([`crate::state::producers`]);
//! - `s` → applied index, next offset, start offset, max timestamp, the
//!   offset-index entries that cover the applied index, and the max
//!   timestamp before the start offset;
//! - `c` + raft index → the conf state a membership change produced
//!   ([`crate::state::confs`]);
//! - `g` + consumer group name → the group's committed offset and delivery
//!   counts ([`crate::state::groups`]).
//!
//! A checkpoint syncs the offset index before it writes `s`, so whatever
//! state sled holds after a crash names index entries that are on disk; the
//! entries applied after it are replayed from the log on restart.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use covet_protocol::batch;
use covet_protocol::internal::PartitionSnapshot;
use prost::Message as _;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::state::groups::{GroupEntry, GroupTable, LogBounds};
use crate::state::offsets::{IndexEntry, OffsetLog};
use crate::state::producers::{ProducerTable, SequenceCheck};

pub use crate::state::offsets::{BatchLocation, OffsetIndex};

const STATE_KEY: &[u8] = b"s";
/// How often a partition that applied something writes its applied state
/// to sled. Longer means fewer writes and a longer replay after a crash.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Where a partition keeps its offset index: beside its Raft log, so the
/// two are created and removed together.
pub fn offsets_path(group_dir: &std::path::Path) -> PathBuf {
    group_dir.join("offsets")
}

/// What readers need to know about a partition right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// First offset still held.
    pub start_offset: u64,
    /// Next offset to be committed; all offsets below are readable.
    pub high_watermark: u64,
}

/// A batch the state machine took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub base_offset: u64,
    pub record_count: u32,
    /// A producer's retry of a batch already stored at `base_offset`: it
    /// was not stored again.
    pub duplicate: bool,
}

/// The part of the state kept under `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Durable {
    applied: u64,
    next_offset: u64,
    start_offset: u64,
    max_timestamp: i64,
    /// Offset-index entries written for the batches applied up to
    /// `applied`.
    index_len: u64,
    /// The running max timestamp before the first batch held (from a
    /// restored snapshot, or the last batch retention removed).
    start_max_timestamp: i64,
    /// Position of the first offset-index entry retention kept.
    index_first: u64,
}

/// Bytes of an encoded [`Durable`].
const DURABLE_LEN: usize = 56;

impl Default for Durable {
    fn default() -> Self {
        // No batch yet: any timestamp raises the max.
        Durable {
            applied: 0,
            next_offset: 0,
            start_offset: 0,
            max_timestamp: i64::MIN,
            index_len: 0,
            start_max_timestamp: i64::MIN,
            index_first: 0,
        }
    }
}

impl Durable {
    fn encode(&self) -> [u8; DURABLE_LEN] {
        let mut b = [0u8; DURABLE_LEN];
        b[0..8].copy_from_slice(&self.applied.to_le_bytes());
        b[8..16].copy_from_slice(&self.next_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.start_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b[32..40].copy_from_slice(&self.index_len.to_le_bytes());
        b[40..48].copy_from_slice(&self.start_max_timestamp.to_le_bytes());
        b[48..56].copy_from_slice(&self.index_first.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Durable> {
        if b.len() != DURABLE_LEN {
            return None;
        }
        Some(Durable {
            applied: u64::from_le_bytes(field(b, 0)?),
            next_offset: u64::from_le_bytes(field(b, 8)?),
            start_offset: u64::from_le_bytes(field(b, 16)?),
            max_timestamp: i64::from_le_bytes(field(b, 24)?),
            index_len: u64::from_le_bytes(field(b, 32)?),
            start_max_timestamp: i64::from_le_bytes(field(b, 40)?),
            index_first: u64::from_le_bytes(field(b, 48)?),
        })
    }
}

/// Reads `N` bytes at `at` of a sled value, if it is long enough.
fn field<const N: usize>(v: &[u8], at: usize) -> Option<[u8; N]> {
    v.get(at..at + N)?.try_into().ok()
}

/// A partition's state machine. Owned by the Raft driver; readers see it
/// through [`OffsetIndex`] and the [`Progress`] watch.
pub struct PartitionState {
    tree: sled::Tree,
    producers: ProducerTable,
    groups: GroupTable,
    durable: Durable,
    offsets: OffsetLog,
    /// Something was applied since the last checkpoint.
    dirty: bool,
    last_checkpoint: Instant,
    progress: watch::Sender<Progress>,
}

impl PartitionState {
    /// Loads the applied state from sled and the offset index at
    /// `index_path` (fresh partitions start empty). State that does not
    /// match its index (a damaged index, or state written by an older
    /// version) is dropped: the group then restores from its snapshot and
    /// replays its log.
    pub fn open(tree: sled::Tree, index_path: PathBuf) -> Result<Self> {
        let stored = tree.get(STATE_KEY)?;
        let durable = match &stored {
            Some(v) => Durable::decode(v),
            None => Some(Durable::default()),
        };
        let opened = match durable {
            Some(d) => {
                OffsetLog::open(index_path.clone(), d.index_len, d.index_first)?.map(|o| (d, o))
            }
            None => None,
        };
        let (durable, offsets, producers, groups) = match opened {
            Some((d, o)) => (d, o, ProducerTable::load(&tree)?, GroupTable::load(&tree)?),
            None => {
                tracing::warn!(
                    index = %index_path.display(),
                    "partition state does not match its offset index; rebuilding it from the log"
                );
                tree.clear()?;
                // Opening with nothing to keep empties the file.
                let o = OffsetLog::open(index_path, 0, 0)?
                    .ok_or_else(|| BrokerError::Internal("empty offset index refused".into()))?;
                (
                    Durable::default(),
                    o,
                    ProducerTable::default(),
                    GroupTable::default(),
                )
            }
        };
        let (progress, _) = watch::channel(Progress {
            start_offset: durable.start_offset,
            high_watermark: durable.next_offset,
        });
        Ok(PartitionState {
            producers,
            groups,
            tree,
            durable,
            offsets,
            dirty: false,
            last_checkpoint: Instant::now(),
            progress,
        })
    }

    pub fn applied(&self) -> u64 {
        self.durable.applied
    }

    pub fn next_offset(&self) -> u64 {
        self.durable.next_offset
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The partition's sled tree, for the membership history
    /// ([`crate::state::confs`]) kept beside the offsets.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    pub fn index(&self) -> OffsetIndex {
        self.offsets.index()
    }

    /// Applies the committed entry at `index` holding a record batch.
    /// Returns the batch's (base offset, record count), or the reason it was
    /// rejected; a rejected entry stays in the log but is never indexed, so
    /// it is never served. Deterministic: every replica decides the same.
    #[tracing::instrument(level = "debug", skip_all, fields(index = index))]
    pub fn apply_batch(&mut self, index: u64, data: &Bytes) -> Result<Accepted> {
        self.mark_applied(index);
        let header =
            batch::read_header(data).map_err(|e| BrokerError::CorruptBatch(e.to_string()))?;
        // The partition's time before this batch: the producer table's clock.
        let clock = self.durable.max_timestamp;
        if let SequenceCheck::Duplicate {
            base_offset,
            record_count,
        } = self.producers.check(&header, data, clock)?
        {
            return Ok(Accepted {
                base_offset,
                record_count,
                duplicate: true,
            });
        }
        if header.base_offset != self.durable.next_offset {
            // The leader that stamped this batch assumed a log tail that did
            // not survive (a leader change dropped earlier proposals).
            return Err(BrokerError::NotLeader { leader_hint: 0 });
        }
        self.durable.max_timestamp = self.durable.max_timestamp.max(header.max_timestamp);
        self.offsets.push(&IndexEntry {
            base_offset: header.base_offset,
            raft_index: index,
            record_count: header.record_count,
            max_timestamp: self.durable.max_timestamp,
            producer_id: header.producer_id,
            base_sequence: header.base_sequence,
            producer_epoch: header.producer_epoch,
        });
        self.producers
            .record(&header, data, header.base_offset, clock);
        self.durable.next_offset = header.next_offset();
        Ok(Accepted {
            base_offset: header.base_offset,
            record_count: header.record_count,
            duplicate: false,
        })
    }

    /// Applies a consumer group's entry (the caller marked its index
    /// applied); see [`crate::state::groups`].
    pub fn apply_group(&mut self, entry: GroupEntry) -> Result<()> {
        let bounds = LogBounds {
            start_offset: self.durable.start_offset,
            next_offset: self.durable.next_offset,
        };
        self.groups.apply(entry, bounds)
    }

    /// The consumer groups' progress on this partition.
    pub fn groups(&self) -> &GroupTable {
        &self.groups
    }

    /// If `data` is a retry of a batch this partition already applied, the
    /// offset it got: the leader answers such a retry without proposing it.
    pub fn applied_duplicate(&self, data: &[u8]) -> Option<(u64, u32)> {
        let header = batch::read_header(data).ok()?;
        match self
            .producers
            .check(&header, data, self.durable.max_timestamp)
        {
            Ok(SequenceCheck::Duplicate {
                base_offset,
                record_count,
            }) => Some((base_offset, record_count)),
            _ => None,
        }
    }

    /// Records that `index` was applied (also for entries that carry no
    /// batch, such as a new leader's empty entry).
    pub fn mark_applied(&mut self, index: u64) {
        self.durable.applied = index;
        self.dirty = true;
    }

    /// Ends an apply round: writes the round's index entries (one `pwrite`,
    /// no sync) and wakes readers. Nothing goes to sled here.
    pub fn flush_round(&mut self) -> Result<()> {
        self.offsets.flush()?;
        self.publish();
        Ok(())
    }

    /// Whether a checkpoint is due: something was applied, and the last
    /// checkpoint is [`CHECKPOINT_EVERY`] old.
    pub fn checkpoint_due(&self) -> bool {
        self.dirty && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
    }

    /// Writes the applied state to sled (see the module docs). Call between
    /// apply rounds.
    pub fn checkpoint(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        self.write_state(sled::Batch::default())
    }

    /// Syncs the offset index, then writes `batch` with the producers
    /// changed since the last write and the state key, atomically.
    fn write_state(&mut self, mut batch: sled::Batch) -> Result<()> {
        self.offsets.flush()?;
        self.offsets.sync()?;
        self.durable.index_len = self.offsets.written();
        self.durable.index_first = self.offsets.first_live();
        self.producers.write_dirty(&mut batch);
        self.groups.write_dirty(&mut batch);
        batch.insert(STATE_KEY, &self.durable.encode()[..]);
        self.tree.apply_batch(batch)?;
        self.dirty = false;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// The consumer groups' applied progress, as readers see it.
    pub fn group_view(&self) -> crate::state::groups::GroupView {
        self.groups.view()
    }

    fn publish(&mut self) {
        let p = Progress {
            start_offset: self.durable.start_offset,
            high_watermark: self.durable.next_offset,
        };
        self.progress.send_if_modified(|cur| {
            let changed = *cur != p;
            *cur = p;
            changed
        });
        // After the progress: a reader that sees a group's new commit (and
        // reads the progress after it, as `describe` does) sees the records
        // it covers, never a committed offset above the high watermark.
        self.groups.publish();
    }

    /// The snapshot describing the state right after `raft_index`, for a
    /// compaction that removes every entry up to it. Its start offset is the
    /// first offset held in an entry after `raft_index`, and its max
    /// timestamp the running max as of `raft_index` (not now: the entries
    /// after it are replayed on restore and raise it themselves). Call
    /// between apply rounds.
    pub fn snapshot_at(&self, raft_index: u64) -> Result<PartitionSnapshot> {
        let pos = self.offsets.find(|e| e.raft_index > raft_index)?;
        let (first, end) = self.offsets.live_span();
        let next = match self.offsets.read(pos, (pos + 1).min(end))?.first() {
            Some(e) => e.base_offset,
            None => self.durable.next_offset,
        };
        // Only each producer's first batch from `next` on matters, and only
        // for producers that wrote since: the scan stops once it has seen
        // them all (usually within the first entries), not at the end of a
        // log that may hold millions of batches.
        let mut needed = self.producers.written_since(next);
        let mut later = Vec::new();
        let mut from = pos;
        while from < end && !needed.is_empty() {
            let to = end.min(from + 4096);
            for e in self.offsets.read(from, to)? {
                if e.producer_id >= 0 && needed.remove(&e.producer_id) {
                    later.push((e.producer_id, e.base_sequence, e.producer_epoch));
                }
            }
            from = to;
        }
        let max_timestamp = if pos > first {
            self.offsets
                .read(pos - 1, pos)?
                .pop()
                .map_or(self.durable.start_max_timestamp, |e| e.max_timestamp)
        } else {
            self.durable.start_max_timestamp
        };
        Ok(PartitionSnapshot {
            start_offset: next,
            next_offset: next,
            applied_index: raft_index,
            max_timestamp,
            producers: self.producers.as_before(&later, next, max_timestamp),
            // Now, not as of `raft_index`: group entries set absolute
            // state, so replaying the later ones over it converges.
            groups: self.groups.snapshot(),
        })
    }

    /// Raises the start offset after the log was compacted, dropping the
    /// index entries of batches that are gone.
    pub fn trim_to(&mut self, start_offset: u64) -> Result<()> {
        if start_offset <= self.durable.start_offset {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        if let Some(last) = self.offsets.trim(start_offset)? {
            // The partition's time at the new start: producers expired by
            // then can be in no snapshot taken from now on.
            self.durable.start_max_timestamp = last.max_timestamp;
            self.producers
                .forget_expired(last.max_timestamp, &mut batch);
        }
        self.durable.start_offset = start_offset;
        self.durable.next_offset = self.durable.next_offset.max(start_offset);
        self.write_state(batch)?;
        self.publish();
        Ok(())
    }

    /// Restores from a snapshot when sled is behind what the log still
    /// holds (sled lost writes that the compacted entries would be needed to
    /// replay).
    pub fn restore(&mut self, snap_bytes: &[u8]) -> Result<()> {
        let snap = PartitionSnapshot::decode(snap_bytes)
            .map_err(|e| BrokerError::Storage(format!("corrupt partition snapshot: {e}")))?;
        if snap.applied_index <= self.durable.applied {
            return self.trim_to(snap.start_offset);
        }
        self.tree.clear()?;
        self.offsets.clear()?;
        self.durable = Durable {
            applied: snap.applied_index,
            next_offset: snap.next_offset,
            start_offset: snap.start_offset,
            max_timestamp: snap.max_timestamp,
            index_len: 0,
            start_max_timestamp: snap.max_timestamp,
            index_first: 0,
        };
        let mut batch = sled::Batch::default();
        self.producers.restore(&snap.producers, &mut batch);
        self.groups.restore(&snap.groups, &mut batch);
        self.write_state(batch)?;
        self.publish();
        Ok(())
    }

    /// Forgets everything: the partition's log is gone.
    pub fn reset(&mut self) -> Result<()> {
        self.tree.clear()?;
        self.offsets.clear()?;
        self.durable = Durable::default();
        self.producers = ProducerTable::default();
        self.groups.restore(&[], &mut sled::Batch::default());
        self.dirty = false;
        self.publish();
        Ok(())
    }
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
