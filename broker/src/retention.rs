//! Retention: trimming a partition's log from the front, whole segments at
//! a time.
//!
//! The Raft log is the partition log, so retention is Raft log compaction.
//! A compaction at raft index `S` (the last index of the newest segment to
//! drop) first makes a snapshot durable — the partition's state right after
//! `S`, which is just its new start offset — and only then unlinks the
//! segments. The log is therefore never trimmed past what a durable snapshot
//! covers, and a restart whose sled lost writes restores from that
//! snapshot and replays the rest. The active segment is never dropped.

use covet_protocol::internal::PartitionSnapshot;
use prost::Message as _;
use raft::prelude::{Snapshot, SnapshotMetadata};
use raft::Storage;

use crate::error::{BrokerError, Result};
use crate::group::{Group, Machine};
use crate::state::confs;

impl Group {
    /// Trims the log to honour `retention_ms` (records whose batch's
    /// running max timestamp is older than `now_ms - retention_ms` go) and
    /// `retention_bytes` (the log stays under it, give or take the active
    /// segment). 0 disables either rule.
    pub fn enforce_retention(
        &mut self,
        now_ms: i64,
        retention_ms: u64,
        retention_bytes: u64,
    ) -> Result<()> {
        if retention_ms == 0 && retention_bytes == 0 {
            return Ok(());
        }
        let Machine::Partition(p) = &mut self.machine else {
            return Ok(());
        };
        // A compaction whose trim failed last time is finished first.
        let snap = self.storage.stored_snapshot();
        if snap.get_metadata().index > 0 {
            let s = PartitionSnapshot::decode(&snap.data[..])
                .map_err(|e| BrokerError::Storage(format!("corrupt partition snapshot: {e}")))?;
            p.trim_to(s.start_offset)?;
        }
        let applied = p.applied();
        let segments = self.storage.segments();
        if segments.len() < 2 {
            return Ok(());
        }
        // Entries below `keep_from` may go.
        let mut keep_from = 0;
        if retention_ms > 0 {
            let cutoff = now_ms.saturating_sub(i64::try_from(retention_ms).unwrap_or(i64::MAX));
            let index = p.index();
            keep_from = match index.offset_for_time(cutoff)? {
                Some(offset) => index.locate(offset)?.map_or(applied + 1, |l| l.raft_index),
                None => applied + 1,
            };
        }
        if retention_bytes > 0 {
            let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
            for s in &segments[..segments.len() - 1] {
                if total <= retention_bytes {
                    break;
                }
                total -= s.bytes;
                keep_from = keep_from.max(s.last_index + 1);
            }
        }
        keep_from = keep_from.min(applied + 1);
        let cut = segments[..segments.len() - 1]
            .iter()
            .take_while(|s| s.last_index < keep_from)
            .last()
            .map(|s| s.last_index);
        let first = self
            .storage
            .first_index()
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        match cut {
            Some(s) if s >= first => self.compact_to(s),
            _ => Ok(()),
        }
    }

    /// Snapshots the partition as of raft index `index` and drops every
    /// segment it covers.
    fn compact_to(&mut self, index: u64) -> Result<()> {
        let Machine::Partition(p) = &mut self.machine else {
            return Ok(());
        };
        let snap: PartitionSnapshot = p.snapshot_at(index)?;
        let term = self
            .storage
            .term(index)
            .map_err(|e| BrokerError::Storage(e.to_string()))?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        // The voters as of `index`, not now: a change applied after it is
        // replayed from the log by whoever installs this snapshot.
        let conf_state = match confs::at(p.tree(), index)? {
            Some(cs) => cs,
            None => self
                .storage
                .stored_snapshot()
                .get_metadata()
                .get_conf_state()
                .clone(),
        };
        meta.set_conf_state(conf_state);
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        snapshot.data = snap.encode_to_vec().into();
        self.storage.compact(snapshot)?;
        p.trim_to(snap.start_offset)?;
        confs::forget_through(p.tree(), index)?;
        tracing::info!(
            group = self.id,
            index,
            start_offset = snap.start_offset,
            "retention trimmed log"
        );
        Ok(())
    }
}
