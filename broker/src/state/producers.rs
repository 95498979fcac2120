//! Idempotent producers: the dedup table of one partition.
//!
//! A batch from an idempotent producer carries its producer id and the
//! sequence number of its first record; a producer numbers its records to
//! each partition 0, 1, 2, … A partition accepts a batch only if it starts
//! at the sequence after the last one it applied from that producer. A
//! batch starting earlier is a retry of one already applied: it is not
//! stored again, and is answered with the offset the original got (the
//! last few batches per producer are remembered for that). A batch starting
//! later arrived ahead of a predecessor still being retried, and is refused
//! as out of sequence so the producer retries it after — unless it carries
//! a higher producer epoch: a producer that gave up on a batch moves the
//! partition to a new epoch, and the gap it left is skipped.
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

    /// Decides on a batch without changing anything.
    pub fn check(&self, h: &BatchHeader) -> Result<SequenceCheck> {
        if h.producer_id < 0 {
            return Ok(SequenceCheck::Accept);
        }
        let Some(p) = self.producers.get(&h.producer_id) else {
            // A producer's first batch here; its sequence starts anywhere
            // (it may have written other partitions, or been forgotten).
            return Ok(SequenceCheck::Accept);
        };
        let epoch = i32::from(h.producer_epoch);
        if h.base_sequence == p.next_sequence && epoch >= p.epoch {
            return Ok(SequenceCheck::Accept);
        }
        if let Some(b) = p.recent.iter().find(|b| b.base_sequence == h.base_sequence) {
            return Ok(SequenceCheck::Duplicate {
                base_offset: b.base_offset,
                record_count: b.record_count,
            });
        }
        // A new epoch may skip sequence numbers the producer gave up on,
        // never go back over ones already stored.
        if epoch > p.epoch && h.base_sequence > p.next_sequence {
            return Ok(SequenceCheck::Accept);
        }
        Err(BrokerError::OutOfOrderSequence {
            producer_id: h.producer_id,
            expected: p.next_sequence,
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
    /// (producer id, base sequence and epoch of each batch after a snapshot
    /// point, in log order): each such producer's next sequence is rolled back to
    /// its first later batch, and its remembered batches (which may be
    /// later ones) are dropped. Replaying the later batches on the result
    /// accepts each of them again, in order.
    pub fn as_before(&self, later: &[(i64, i32, i16)]) -> Vec<ProducerState> {
        let mut out: HashMap<i64, ProducerState> = self.producers.clone();
        let mut rolled = std::collections::HashSet::new();
        for &(pid, seq, epoch) in later {
            if rolled.insert(pid) {
                if let Some(p) = out.get_mut(&pid) {
                    // What that first later batch found: it was accepted as
                    // the next in sequence, in its epoch or a newer one.
                    p.next_sequence = seq;
                    p.epoch = i32::from(epoch).min(p.epoch);
                    p.recent.clear();
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
