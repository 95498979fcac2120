//! The partition state machine: offsets, and the lookups that let readers
//! find a record in the Raft log.
//!
//! The Raft log *is* the partition log. Applying a committed entry does not
//! copy the batch anywhere; it checks that the base offset the leader stamped
//! is the next offset, advances the high watermark, and records in sled
//! where the batch lives:
//!
//! - `o` + base offset (u64 BE) → raft index (u64 LE) ‖ record count (u32 LE)
//!   ‖ max timestamp (i64 LE) ‖ producer id (i64 LE) ‖ base sequence (i32
//!   LE) ‖ producer epoch (i16 LE): one key per accepted batch, so readers find
//!   the entry holding any offset with one range lookup, and entries the
//!   state machine rejected are never served;
//! - `t` + running max timestamp (order-preserving u64 BE) → base offset:
//!   written when a batch raises the partition's max timestamp, so a
//!   timestamp seek is one range lookup;
//! - `q` + producer id → the idempotent-producer dedup entry
//!   ([`crate::state::producers`]);
//! - `s` → applied index, next offset, start offset, max
//!   timestamp;
//! - `c` + raft index → the conf state a membership change produced
//!   ([`crate::state::confs`]).

use bytes::Bytes;
use covet_protocol::batch;
use covet_protocol::internal::PartitionSnapshot;
use prost::Message as _;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::state::producers::{ProducerTable, SequenceCheck};

const STATE_KEY: &[u8] = b"s";

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

/// Where a batch lives, from the offset index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLocation {
    pub base_offset: u64,
    pub raft_index: u64,
    pub record_count: u32,
}

/// The part of the state kept under `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Durable {
    applied: u64,
    next_offset: u64,
    start_offset: u64,
    max_timestamp: i64,
}

impl Default for Durable {
    fn default() -> Self {
        // No batch yet: any timestamp raises the max.
        Durable {
            applied: 0,
            next_offset: 0,
            start_offset: 0,
            max_timestamp: i64::MIN,
        }
    }
}

impl Durable {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.applied.to_le_bytes());
        b[8..16].copy_from_slice(&self.next_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.start_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.max_timestamp.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Durable> {
        Some(Durable {
            applied: u64::from_le_bytes(field(b, 0)?),
            next_offset: u64::from_le_bytes(field(b, 8)?),
            start_offset: u64::from_le_bytes(field(b, 16)?),
            max_timestamp: i64::from_le_bytes(field(b, 24)?),
        })
    }
}

fn offset_key(offset: u64) -> [u8; 9] {
    let mut k = [b'o'; 9];
    k[1..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn time_key(ts: i64) -> [u8; 9] {
    // Flipping the sign bit makes the big-endian bytes sort like the i64.
    let mut k = [b't'; 9];
    k[1..].copy_from_slice(&((ts as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// Reads `N` bytes at `at` of a sled value, if it is long enough.
fn field<const N: usize>(v: &[u8], at: usize) -> Option<[u8; N]> {
    v.get(at..at + N)?.try_into().ok()
}

fn decode_time_key(key: &[u8]) -> Option<i64> {
    let raw = u64::from_be_bytes(field(key, 1)?);
    Some((raw ^ (1 << 63)) as i64)
}

fn decode_location(key: &[u8], value: &[u8]) -> Option<BatchLocation> {
    Some(BatchLocation {
        base_offset: u64::from_be_bytes(field(key, 1)?),
        raft_index: u64::from_le_bytes(field(value, 0)?),
        record_count: u32::from_le_bytes(field(value, 8)?),
    })
}

/// Read-only lookups over a partition's sled tree, shared with readers.
#[derive(Clone)]
pub struct OffsetIndex {
    tree: sled::Tree,
}

impl OffsetIndex {
    pub fn new(tree: sled::Tree) -> Self {
        OffsetIndex { tree }
    }

    /// The batch holding `offset`, if it is indexed.
    pub fn locate(&self, offset: u64) -> Result<Option<BatchLocation>> {
        let found = self
            .tree
            .range(offset_key(0)..=offset_key(offset))
            .next_back();
        Ok(match found.transpose()? {
            Some((k, v)) => decode_location(&k, &v)
                .filter(|l| offset < l.base_offset.saturating_add(u64::from(l.record_count))),
            None => None,
        })
    }

    /// Up to `limit` batches starting with the one holding `offset`.
    pub fn batches_from(&self, offset: u64, limit: usize) -> Result<Vec<BatchLocation>> {
        let first = match self.locate(offset)? {
            Some(l) => l.base_offset,
            None => offset,
        };
        let mut out = Vec::new();
        for item in self.tree.range(offset_key(first)..=offset_key(u64::MAX)) {
            let (k, v) = item?;
            match decode_location(&k, &v) {
                Some(l) => out.push(l),
                None => return Err(BrokerError::Internal("bad offset index entry".into())),
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The base offset of the first batch whose running max timestamp is at
    /// or after `ts`.
    pub fn offset_for_time(&self, ts: i64) -> Result<Option<u64>> {
        let found = self.tree.range(time_key(ts)..=time_key(i64::MAX)).next();
        Ok(match found.transpose()? {
            Some((_, v)) => field(&v, 0).map(u64::from_le_bytes),
            None => None,
        })
    }
}

/// A partition's state machine. Owned by the Raft driver; readers see it
/// through [`OffsetIndex`] and the [`Progress`] watch.
pub struct PartitionState {
    tree: sled::Tree,
    producers: ProducerTable,
    durable: Durable,
    pending: sled::Batch,
    dirty: bool,
    progress: watch::Sender<Progress>,
}

impl PartitionState {
    /// Loads the applied state from sled (fresh partitions start empty).
    pub fn open(tree: sled::Tree) -> Result<Self> {
        let durable = match tree.get(STATE_KEY)? {
            Some(v) => Durable::decode(&v)
                .ok_or_else(|| BrokerError::Storage("corrupt partition state in sled".into()))?,
            None => Durable::default(),
        };
        let (progress, _) = watch::channel(Progress {
            start_offset: durable.start_offset,
            high_watermark: durable.next_offset,
        });
        Ok(PartitionState {
            producers: ProducerTable::load(&tree)?,
            tree,
            durable,
            pending: sled::Batch::default(),
            dirty: false,
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
        OffsetIndex::new(self.tree.clone())
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
        let mut value = [0u8; 34];
        value[0..8].copy_from_slice(&index.to_le_bytes());
        value[8..12].copy_from_slice(&header.record_count.to_le_bytes());
        value[12..20].copy_from_slice(&header.max_timestamp.to_le_bytes());
        value[20..28].copy_from_slice(&header.producer_id.to_le_bytes());
        value[28..32].copy_from_slice(&header.base_sequence.to_le_bytes());
        value[32..34].copy_from_slice(&header.producer_epoch.to_le_bytes());
        self.pending
            .insert(&offset_key(header.base_offset)[..], &value[..]);
        if header.max_timestamp > self.durable.max_timestamp {
            self.durable.max_timestamp = header.max_timestamp;
            self.pending.insert(
                &time_key(self.durable.max_timestamp)[..],
                &header.base_offset.to_le_bytes()[..],
            );
        }
        self.producers
            .record(&header, data, header.base_offset, clock, &mut self.pending);
        self.durable.next_offset = header.next_offset();
        Ok(Accepted {
            base_offset: header.base_offset,
            record_count: header.record_count,
            duplicate: false,
        })
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

    /// Writes this round's applied state to sled (no sync) and wakes readers.
    pub fn flush_round(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.pending);
        batch.insert(STATE_KEY, &self.durable.encode()[..]);
        self.tree.apply_batch(batch)?;
        self.dirty = false;
        self.publish();
        Ok(())
    }

    fn publish(&self) {
        let p = Progress {
            start_offset: self.durable.start_offset,
            high_watermark: self.durable.next_offset,
        };
        self.progress.send_if_modified(|cur| {
            let changed = *cur != p;
            *cur = p;
            changed
        });
    }

    /// The snapshot describing the state right after `raft_index`, for a
    /// compaction that removes every entry up to it. Its start offset is the
    /// first offset held in an entry after `raft_index`, and its max
    /// timestamp the running max as of `raft_index` (not now: the entries
    /// after it are replayed on restore and raise it themselves).
    pub fn snapshot_at(&self, raft_index: u64) -> Result<PartitionSnapshot> {
        let mut next = self.durable.next_offset;
        for item in self
            .tree
            .range(offset_key(self.durable.start_offset)..=offset_key(u64::MAX))
        {
            let (k, v) = item?;
            if let Some(l) = decode_location(&k, &v) {
                if l.raft_index > raft_index {
                    next = l.base_offset;
                    break;
                }
            }
        }
        let mut later = Vec::new();
        for item in self.tree.range(offset_key(next)..=offset_key(u64::MAX)) {
            let (_, v) = item?;
            let producer = field(&v, 20).map(i64::from_le_bytes);
            let sequence = field(&v, 28).map(i32::from_le_bytes);
            let epoch = field(&v, 32).map(i16::from_le_bytes);
            if let (Some(pid), Some(seq), Some(epoch)) = (producer, sequence, epoch) {
                if pid >= 0 {
                    later.push((pid, seq, epoch));
                }
            }
        }
        let mut max_timestamp = i64::MIN;
        for item in self.tree.range(time_key(i64::MIN)..=time_key(i64::MAX)) {
            let (k, v) = item?;
            let base = field(&v, 0).map(u64::from_le_bytes);
            match (base, decode_time_key(&k)) {
                (Some(b), Some(ts)) if b < next => max_timestamp = ts,
                _ => break,
            }
        }
        Ok(PartitionSnapshot {
            start_offset: next,
            next_offset: next,
            applied_index: raft_index,
            max_timestamp,
            producers: self.producers.as_before(&later, next, max_timestamp),
        })
    }

    /// Raises the start offset after the log was compacted, dropping index
    /// keys of batches that are gone.
    pub fn trim_to(&mut self, start_offset: u64) -> Result<()> {
        if start_offset <= self.durable.start_offset {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for item in self.tree.range(offset_key(0)..offset_key(start_offset)) {
            batch.remove(item?.0);
        }
        // Time keys of removed batches go, but the newest of them is
        // re-pointed at the new start: the retained batches before the next
        // time key share its running max, so a seek to an older timestamp
        // must land on the start offset.
        let mut last_removed = None;
        for item in self.tree.range(time_key(i64::MIN)..=time_key(i64::MAX)) {
            let (k, v) = item?;
            let base = field(&v, 0).map(u64::from_le_bytes);
            if base.is_some_and(|b| b < start_offset) {
                batch.remove(k.clone());
                last_removed = Some(k);
            }
        }
        if let Some(k) = last_removed {
            // The partition's time at the new start: producers expired by
            // then can be in no snapshot taken from now on.
            if let Some(clock) = decode_time_key(&k) {
                self.producers.forget_expired(clock, &mut batch);
            }
            batch.insert(k, &start_offset.to_le_bytes()[..]);
        }
        self.durable.start_offset = start_offset;
        self.durable.next_offset = self.durable.next_offset.max(start_offset);
        batch.insert(STATE_KEY, &self.durable.encode()[..]);
        self.tree.apply_batch(batch)?;
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
        self.durable = Durable {
            applied: snap.applied_index,
            next_offset: snap.next_offset,
            start_offset: snap.start_offset,
            max_timestamp: snap.max_timestamp,
        };
        let mut batch = sled::Batch::default();
        if snap.max_timestamp > i64::MIN {
            // Batches from the start offset on share this running max until
            // a later one raises it: a seek to an older time lands on the
            // start.
            batch.insert(
                &time_key(snap.max_timestamp)[..],
                &snap.start_offset.to_le_bytes()[..],
            );
        }
        self.producers.restore(&snap.producers, &mut batch);
        batch.insert(STATE_KEY, &self.durable.encode()[..]);
        self.tree.apply_batch(batch)?;
        self.publish();
        Ok(())
    }

    /// Forgets everything: the partition's log is gone.
    pub fn reset(&mut self) -> Result<()> {
        self.tree.clear()?;
        self.durable = Durable::default();
        self.producers = ProducerTable::default();
        self.pending = sled::Batch::default();
        self.dirty = false;
        self.publish();
        Ok(())
    }
}

#[cfg(test)]
#[path = "partition_tests.rs"]
mod tests;
