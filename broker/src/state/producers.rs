//! Idempotent producers: the dedup table of one partition, and the
//! sequence rules it enforces.
//!
//! A batch from an idempotent producer carries its producer id, a producer
//! epoch and the sequence number of its first record. A producer numbers
//! its records to each partition 0, 1, 2, … without gaps (an `i32` that
//! wraps), in every epoch alike: a new epoch does not restart the count.
//! Per producer the table keeps the epoch `E` and next sequence `S` of the
//! last batch it accepted, and the last 128 (`RECENT`) accepted batches (base
//! sequence → base offset, record count). A producer not in the table
//! counts as `E = 0, S = 0`, nothing remembered. A batch `(e, s)` is, in
//! this order:
//!
//! 1. **a duplicate** if `s` is the base sequence of a remembered batch,
//!    whatever `e`, and it is the same batch: it is not stored again and
//!    is answered with the original base offset and record count (a retry
//!    re-stamped in a newer epoch, or a stale attempt in an older one, is
//!    still the same batch). "The same" is proved by an identity checksum
//!    ([`identity`]: CRC32C of the CRC-covered bytes with the epoch read as
//!    0, so an epoch re-stamp keeps it); a batch with a remembered sequence
//!    and another identity is **refused with `DUPLICATE_SEQUENCE`** (not
//!    retriable): two clients share the producer id, and acknowledging it
//!    at the other batch's offset would lose it;
//! 2. **accepted** if `e = E` and `s = S`: the next in sequence;
//! 3. **accepted** if `e > E` and `s` is at or ahead of `S` (within 2³¹):
//!    the producer gave up on sequences `S..s` and moved to a new epoch;
//!    the gap is skipped, never gone back over;
//! 4. **refused with `OUT_OF_ORDER_SEQUENCE`** otherwise: in the same epoch
//!    a predecessor has not arrived (or is older than the remembered
//!    window); in an older epoch the producer has moved on; in a newer
//!    epoch `s` is behind what was stored.
//!
//! So a producer's first batch on a partition must start at sequence 0
//! unless it is in a new epoch: a batch that overtook the first one (sent
//! to another leader, say) waits for it instead of being taken as the
//! start. Rule 3 can skip over a batch still in flight, so it is safe only
//! because the producer keeps its side of the contract (the Rust producer
//! does, see `client-rust/src/producer/sender.rs`): it moves a partition to
//! a new epoch only when none of that partition's batches is out on a
//! stream, and sends the new epoch's first batch alone until it is
//! acknowledged. Then every batch the gap covers was given up on, and any
//! attempt of one still in a log is applied before the new epoch's first
//! batch (and stored, in order) or after it (and refused: older epoch).
//!
//! Rule 1 answers every retry of a stored batch only if it is among the
//! last 128 (`RECENT`) stored; the Rust producer keeps at most that many
//! batches per partition unanswered, out to one node at a time (one stream
//! answers in order), so its retries always are.
//!
//! # Bounds and expiry
//!
//! The table holds at most [`MAX_PRODUCERS`] live producers per partition.
//! A producer *expires* when the partition's time (the running max record
//! timestamp of the batches applied, the clock every replica shares) is
//! more than [`PRODUCER_IDLE_EXPIRY_MS`] (7 days) past the partition's time
//! when its last batch was applied. An expired producer counts as not in
//! the table (rule 1 no longer answers its retries; its next batch must
//! start at sequence 0 or in a new epoch, as a new producer's) and does not
//! count against the cap. A batch that would add a new (or expired)
//! producer to a full table is **refused with `PRODUCER_TABLE_FULL`**: the
//! producers already there keep their guarantees; nobody is evicted before
//! their time. Expired entries leave memory and sled when the log is
//! compacted past the point at which they expired
//! ([`ProducerTable::forget_expired`]): until then a snapshot taken before
//! that point may still need them.
//!
//! Known limits: the partition's time comes from producers' timestamps, so
//! a client writing timestamps far in the future makes every producer of
//! that partition expire early (the broker does not stamp append time
//! yet); expired entries of a partition that is never compacted (no
//! retention) stay in memory, though they no longer count.
//!
//! # Only allocated producer ids
//!
//! Producer ids come from the metadata group (`InitProducer`). A produce
//! with an id at or above the allocation mark this node has applied is
//! refused before it is proposed (`UNKNOWN_PRODUCER_ID`, see
//! [`crate::catalog::Catalog::check_producer`]): a stranger can no longer
//! claim an id before the producer it will be handed to.
//!
//! A refusal is a decision about one log entry; every replica makes the
//! same one, and the table travels in partition snapshots.
//!
//! sled layout (in the partition's tree): `q` + producer id (i64 BE,
//! sign-flipped) → `ProducerState` (protobuf).

use std::collections::HashMap;

use covet_protocol::batch::BatchHeader;
use covet_protocol::internal::{ProducerState, SequencedBatch};
use prost::Message as _;

use crate::error::{BrokerError, Result};

/// Batches remembered per producer for answering retries.
/// (at least a producer's in-flight window per partition, so any batch a
/// producer may still retry is remembered).
const RECENT: usize = 128;

/// Most live producers a partition remembers.
pub const MAX_PRODUCERS: usize = 1024;

/// How far the partition's time must move past a producer's last batch for
/// the producer to expire: 7 days.
pub const PRODUCER_IDLE_EXPIRY_MS: i64 = 7 * 24 * 3600 * 1000;

/// Where the producer epoch sits in a batch header, and where the
/// CRC-covered bytes begin (see `covet_protocol::batch`).
const EPOCH_AT: usize = 47;
const CRC_FROM: usize = 17;

/// The identity of a batch for dedup: CRC32C of its CRC-covered bytes with
/// the producer epoch read as 0, so a resend re-stamped in another epoch
/// (`batch::with_producer_epoch`) keeps it while any other change to the
/// header or the records does not. `batch` must be at least a header long.
pub fn identity(batch: &[u8]) -> u32 {
    let (Some(before), Some(after)) = (batch.get(CRC_FROM..EPOCH_AT), batch.get(EPOCH_AT + 2..))
    else {
        return 0;
    };
    let crc = crc32c::crc32c(before);
    let crc = crc32c::crc32c_append(crc, &[0, 0]);
    crc32c::crc32c_append(crc, after)
}

/// The table's bounds (constants in production; small in tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_producers: usize,
    pub idle_expiry_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_producers: MAX_PRODUCERS,
            idle_expiry_ms: PRODUCER_IDLE_EXPIRY_MS,
        }
    }
}

impl Limits {
    /// Whether `p` has expired when the partition's time is `clock`.
    fn expired(&self, p: &ProducerState, clock: i64) -> bool {
        p.last_time
            .is_some_and(|t| clock.saturating_sub(t) > self.idle_expiry_ms)
    }
}

/// What the table says about an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// Not from an idempotent producer, or the next in sequence.
    Accept,
    /// A retry of a batch applied at this base offset.
    Duplicate { base_offset: u64, record_count: u32 },
}

fn key(producer_id: i64) -> [u8; 9] {
    let mut k = [b'q'; 9];
    k[1..].copy_from_slice(&((producer_id as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// The dedup table.
#[derive(Default)]
pub struct ProducerTable {
    producers: HashMap<i64, ProducerState>,
    /// Producers changed since their entries were last written to sled
    /// (at a checkpoint of the partition's applied state).
    dirty: std::collections::HashSet<i64>,
    pub(crate) limits: Limits,
}

impl ProducerTable {
    pub fn load(tree: &sled::Tree) -> Result<ProducerTable> {
        let mut producers = HashMap::new();
        for item in tree.scan_prefix(b"q") {
            let (_, v) = item?;
            let p = ProducerState::decode(&v[..])
                .map_err(|e| BrokerError::Storage(format!("corrupt producer state: {e}")))?;
            producers.insert(p.producer_id, p);
        }
        Ok(ProducerTable {
            producers,
            dirty: Default::default(),
            limits: Limits::default(),
        })
    }

    /// The producer's entry, unless absent or expired at `clock`.
    fn live(&self, producer_id: i64, clock: i64) -> Option<&ProducerState> {
        self.producers
            .get(&producer_id)
            .filter(|p| !self.limits.expired(p, clock))
    }

    /// Decides on `batch` (whose header is `h`) when the partition's time
    /// is `clock`, without changing anything (the rules in the module
    /// documentation).
    pub fn check(&self, h: &BatchHeader, batch: &[u8], clock: i64) -> Result<SequenceCheck> {
        if h.producer_id < 0 {
            return Ok(SequenceCheck::Accept);
        }
        let live = self.live(h.producer_id, clock);
        let (epoch, next, recent) = match live {
            Some(p) => (p.epoch, p.next_sequence, &p.recent[..]),
            None => (0, 0, &[][..]),
        };
        if live.is_some() && i32::from(h.producer_epoch) == epoch && h.base_sequence == next {
            // The common case, the next batch in sequence: every remembered
            // batch has a lower sequence (the last 128 batches cannot span
            // a wrap of the 32-bit sequence), so none can match.
            return Ok(SequenceCheck::Accept);
        }
        if let Some(b) = recent.iter().find(|b| b.base_sequence == h.base_sequence) {
            if b.identity.is_some_and(|id| id != identity(batch)) {
                return Err(BrokerError::DuplicateSequence {
                    producer_id: h.producer_id,
                    sequence: h.base_sequence,
                    stored_at: b.base_offset,
                });
            }
            return Ok(SequenceCheck::Duplicate {
                base_offset: b.base_offset,
                record_count: b.record_count,
            });
        }
        let ahead = h.base_sequence.wrapping_sub(next);
        let accepted = match i32::from(h.producer_epoch).cmp(&epoch) {
            std::cmp::Ordering::Equal => ahead == 0,
            std::cmp::Ordering::Greater => ahead >= 0,
            std::cmp::Ordering::Less => false,
        };
        if !accepted {
            return Err(BrokerError::OutOfOrderSequence {
                producer_id: h.producer_id,
                expected: next,
                got: h.base_sequence,
            });
        }
        if live.is_none() && self.live_count(clock) >= self.limits.max_producers {
            return Err(BrokerError::ProducerTableFull {
                limit: self.limits.max_producers,
            });
        }
        Ok(SequenceCheck::Accept)
    }

    /// Producers not expired at `clock`.
    fn live_count(&self, clock: i64) -> usize {
        self.producers
            .values()
            .filter(|p| !self.limits.expired(p, clock))
            .count()
    }

    /// Records an accepted `batch` (header `h`) stored at `base_offset`,
    /// applied when the partition's time was `clock`. The entry reaches
    /// sled at the next [`ProducerTable::write_dirty`].
    pub fn record(&mut self, h: &BatchHeader, batch: &[u8], base_offset: u64, clock: i64) {
        if h.producer_id < 0 {
            return;
        }
        let fresh = ProducerState {
            producer_id: h.producer_id,
            first_offset: base_offset,
            ..Default::default()
        };
        if self.live(h.producer_id, clock).is_none() {
            // New, or expired and back: a new entry (what it had is gone).
            self.producers.insert(h.producer_id, fresh);
        }
        let Some(p) = self.producers.get_mut(&h.producer_id) else {
            return;
        };
        let time = clock.max(h.max_timestamp);
        p.next_sequence = h.base_sequence.wrapping_add(h.record_count as i32);
        p.epoch = p.epoch.max(i32::from(h.producer_epoch));
        p.last_time = Some(time);
        p.recent.push(SequencedBatch {
            base_sequence: h.base_sequence,
            base_offset,
            record_count: h.record_count,
            identity: Some(identity(batch)),
            time: Some(time),
        });
        if p.recent.len() > RECENT {
            p.recent.remove(0);
        }
        self.dirty.insert(h.producer_id);
    }

    /// Adds the entries changed since the last call to `pending`.
    pub fn write_dirty(&mut self, pending: &mut sled::Batch) {
        for id in self.dirty.drain() {
            if let Some(p) = self.producers.get(&id) {
                pending.insert(&key(id)[..], p.encode_to_vec());
            }
        }
    }

    /// The table as it was before the batches in `later` were applied
    /// (producer id, base sequence and epoch of each batch stored at or
    /// after offset `next_offset`, a snapshot point, in log order), when
    /// the partition's time was `clock`. A producer whose entry began at or
    /// after `next_offset` is left out (it was absent, or expired, which
    /// decides alike). Each other such producer is set to its first later
    /// batch's epoch and sequence, so replaying the later batches on the
    /// result accepts each of them again, in order, and refuses what was
    /// refused; of its remembered batches only those stored before
    /// `next_offset` are kept, so a retry of one is still answered with its
    /// offset, and its last time is that of the newest of them (or `clock`
    /// if none is left: it was live then, or its first later batch would
    /// have begun a new entry).
    pub fn as_before(
        &self,
        later: &[(i64, i32, i16)],
        next_offset: u64,
        clock: i64,
    ) -> Vec<ProducerState> {
        let mut out: HashMap<i64, ProducerState> = self.producers.clone();
        let mut rolled = std::collections::HashSet::new();
        for &(pid, seq, epoch) in later {
            if !rolled.insert(pid) {
                continue;
            }
            let Some(p) = out.get_mut(&pid) else {
                continue;
            };
            if p.first_offset >= next_offset {
                out.remove(&pid);
                continue;
            }
            // What that first later batch found: it was accepted as the
            // next in sequence in its epoch (or as a new epoch skipping
            // ahead, which this state also accepts, and for the same
            // batches).
            p.next_sequence = seq;
            p.epoch = i32::from(epoch);
            p.recent.retain(|b| b.base_offset < next_offset);
            p.last_time = match p.recent.last() {
                Some(b) => b.time,
                None => Some(clock),
            };
        }
        let mut v: Vec<ProducerState> = out.into_values().collect();
        v.sort_by_key(|p| p.producer_id);
        v
    }

    /// Drops the entries expired when the partition's time was `clock`
    /// (the time at the new start of the log, after compaction: no
    /// snapshot can be taken before it any more), adding the removals to
    /// `pending`.
    pub fn forget_expired(&mut self, clock: i64, pending: &mut sled::Batch) {
        let limits = self.limits;
        self.producers.retain(|&id, p| {
            let keep = !limits.expired(p, clock);
            if !keep {
                pending.remove(&key(id)[..]);
            }
            keep
        });
        let producers = &self.producers;
        self.dirty.retain(|id| producers.contains_key(id));
    }

    /// Replaces the table (restore from a snapshot), writing it to
    /// `pending`.
    pub fn restore(&mut self, states: &[ProducerState], pending: &mut sled::Batch) {
        self.producers.clear();
        self.dirty.clear();
        for p in states {
            pending.insert(&key(p.producer_id)[..], p.encode_to_vec());
            self.producers.insert(p.producer_id, p.clone());
        }
    }

    /// Producers with a batch stored at or after `offset`: the ones whose
    /// first such batch [`ProducerTable::as_before`] needs to see.
    pub fn written_since(&self, offset: u64) -> std::collections::HashSet<i64> {
        self.producers
            .values()
            .filter(|p| p.recent.last().is_some_and(|b| b.base_offset >= offset))
            .map(|p| p.producer_id)
            .collect()
    }

    /// Entries held, live or expired (for tests and metrics).
    pub fn entries(&self) -> usize {
        self.producers.len()
    }
}
