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
//!    whatever `e`: it is not stored again and is answered with the
//!    original base offset and record count (a retry re-stamped in a newer
//!    epoch, or a stale attempt in an older one, is still the same batch);
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
        Ok(ProducerTable { producers })
    }

    /// Decides on a batch without changing anything (the rules in the
    /// module documentation).
    pub fn check(&self, h: &BatchHeader) -> Result<SequenceCheck> {
        if h.producer_id < 0 {
            return Ok(SequenceCheck::Accept);
        }
        let (epoch, next, recent) = match self.producers.get(&h.producer_id) {
            Some(p) => (p.epoch, p.next_sequence, &p.recent[..]),
            None => (0, 0, &[][..]),
        };
        if let Some(b) = recent.iter().find(|b| b.base_sequence == h.base_sequence) {
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
        if accepted {
            return Ok(SequenceCheck::Accept);
        }
        Err(BrokerError::OutOfOrderSequence {
            producer_id: h.producer_id,
            expected: next,
            got: h.base_sequence,
        })
    }

    /// Records an accepted batch stored at `base_offset`, adding the write
    /// to `pending`.
    pub fn record(&mut self, h: &BatchHeader, base_offset: u64, pending: &mut sled::Batch) {
        if h.producer_id < 0 {
            return;
        }
        let p = self
            .producers
            .entry(h.producer_id)
            .or_insert_with(|| ProducerState {
                producer_id: h.producer_id,
                ..Default::default()
            });
        p.next_sequence = h.base_sequence.wrapping_add(h.record_count as i32);
        p.epoch = p.epoch.max(i32::from(h.producer_epoch));
        p.recent.push(SequencedBatch {
            base_sequence: h.base_sequence,
            base_offset,
            record_count: h.record_count,
        });
        if p.recent.len() > RECENT {
            p.recent.remove(0);
        }
        pending.insert(&key(h.producer_id)[..], p.encode_to_vec());
    }

    /// The table as it was before the batches in `later` were applied
    /// (producer id, base sequence and epoch of each batch stored at or
    /// after offset `next_offset`, a snapshot point, in log order). Each
    /// such producer is set to its first later batch's epoch and sequence,
    /// so replaying the later batches on the result accepts each of them
    /// again, in order, and refuses what was refused; of its remembered
    /// batches only those stored before `next_offset` are kept, so a retry
    /// of one is still answered with its offset.
    pub fn as_before(&self, later: &[(i64, i32, i16)], next_offset: u64) -> Vec<ProducerState> {
        let mut out: HashMap<i64, ProducerState> = self.producers.clone();
        let mut rolled = std::collections::HashSet::new();
        for &(pid, seq, epoch) in later {
            if rolled.insert(pid) {
                if let Some(p) = out.get_mut(&pid) {
                    // What that first later batch found: it was accepted as
                    // the next in sequence in its epoch (or as a new epoch
                    // skipping ahead, which this state also accepts, and
                    // for the same batches).
                    p.next_sequence = seq;
                    p.epoch = i32::from(epoch);
                    p.recent.retain(|b| b.base_offset < next_offset);
                }
            }
        }
        let mut v: Vec<ProducerState> = out.into_values().collect();
        v.sort_by_key(|p| p.producer_id);
        v
    }

    /// Replaces the table (restore from a snapshot), writing it to
    /// `pending`.
    pub fn restore(&mut self, states: &[ProducerState], pending: &mut sled::Batch) {
        self.producers.clear();
        for p in states {
            pending.insert(&key(p.producer_id)[..], p.encode_to_vec());
            self.producers.insert(p.producer_id, p.clone());
        }
    }
}
