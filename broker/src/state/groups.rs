//! Consumer groups' progress on one partition: the committed offset and
//! delivery counts of each group, replicated by the partition's Raft group
//! (see `docs/adr/0009-consumer-groups.md`).
//!
//! Three kinds of Raft entry carry it, told apart from record batches by
//! the entry's context (a batch has none):
//!
//! - `gc`, a [`GroupCommit`]: raises the group's committed offset to the
//!   one carried (a lower one keeps the current one, so a late or repeated
//!   commit never moves it back) and replaces its delivery counts with
//!   those at or after the resulting committed offset;
//! - `gr`, a [`GroupReset`]: sets the committed offset to any offset up to
//!   the high watermark, backwards included, and forgets the delivery
//!   counts. One below the log's start is kept as it is (delivery then
//!   starts at the log's start): clamping it would depend on the start,
//!   which a replica that restored a snapshot sees higher than the one that
//!   applied the entry in its time;
//! - `gd`, a [`GroupDelete`]: forgets the group.
//!
//! Each sets absolute state, so replaying entries over a table that
//! already holds their effect (a snapshot taken after its applied index,
//! see `PartitionSnapshot.groups`) ends in the same table.
//!
//! The table is part of the partition's applied state: written to its sled
//! tree at checkpoints (`g` + group name → the encoded [`GroupCommit`]) and
//! carried in its snapshots. Every decode of an entry is bounded (at most
//! [`MAX_DELIVERIES`] delivery counts) and an invalid entry is refused the
//! same way on every replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use covet_protocol::internal::{Delivery, GroupCommit, GroupDelete, GroupReset};
use covet_protocol::topic::validate_group_name;
use prost::Message as _;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};

/// Entry context of a [`GroupCommit`].
pub const CONTEXT_COMMIT: &[u8] = b"gc";
/// Entry context of a [`GroupReset`].
pub const CONTEXT_RESET: &[u8] = b"gr";
/// Entry context of a [`GroupDelete`].
pub const CONTEXT_DELETE: &[u8] = b"gd";

/// The most delivery counts one commit may carry: records delivered and
/// not acknowledged, across the group's members on this partition (ADR
/// 0009 caps `max_in_flight` at 10,000 per member).
pub const MAX_DELIVERIES: usize = 100_000;

/// Largest encoded group entry accepted: a name and [`MAX_DELIVERIES`]
/// counts at their widest varints, with room to spare.
const MAX_ENTRY_BYTES: usize = 1024 + MAX_DELIVERIES * 20;

const KEY_PREFIX: &[u8] = b"g";

/// A group entry of a partition's Raft log.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupEntry {
    Commit(GroupCommit),
    Reset(GroupReset),
    Delete(GroupDelete),
}

impl GroupEntry {
    /// The entry an entry's `context` and `data` hold; `None` for a record
    /// batch (empty context). Unknown contexts and undecodable or
    /// oversized payloads are errors.
    pub fn decode(context: &[u8], data: &[u8]) -> Result<Option<GroupEntry>> {
        if context.is_empty() {
            return Ok(None);
        }
        if data.len() > MAX_ENTRY_BYTES {
            return Err(BrokerError::InvalidRequest(format!(
                "group entry of {} bytes, the limit is {MAX_ENTRY_BYTES}",
                data.len()
            )));
        }
        let bad = |e: prost::DecodeError| BrokerError::InvalidRequest(format!("group entry: {e}"));
        let entry = match context {
            CONTEXT_COMMIT => GroupEntry::Commit(GroupCommit::decode(data).map_err(bad)?),
            CONTEXT_RESET => GroupEntry::Reset(GroupReset::decode(data).map_err(bad)?),
            CONTEXT_DELETE => GroupEntry::Delete(GroupDelete::decode(data).map_err(bad)?),
            other => {
                return Err(BrokerError::InvalidRequest(format!(
                    "unknown partition entry context {other:?}"
                )))
            }
        };
        Ok(Some(entry))
    }

    /// The (context, data) to propose.
    pub fn encode(&self) -> (&'static [u8], Bytes) {
        match self {
            GroupEntry::Commit(c) => (CONTEXT_COMMIT, c.encode_to_vec().into()),
            GroupEntry::Reset(r) => (CONTEXT_RESET, r.encode_to_vec().into()),
            GroupEntry::Delete(d) => (CONTEXT_DELETE, d.encode_to_vec().into()),
        }
    }

    /// The group the entry is about.
    pub fn group(&self) -> &str {
        match self {
            GroupEntry::Commit(c) => &c.group,
            GroupEntry::Reset(r) => &r.group,
            GroupEntry::Delete(d) => &d.group,
        }
    }
}

/// The partition's offsets an entry is checked against when applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// First offset still held.
    pub start_offset: u64,
    /// The high watermark: the next offset to be written.
    pub next_offset: u64,
}

/// What readers (group sessions, `group describe`) see of the table: the
/// applied state as of the last apply round.
pub type GroupView = watch::Receiver<Arc<BTreeMap<String, GroupCommit>>>;

/// The groups' progress on one partition.
#[derive(Debug)]
pub struct GroupTable {
    groups: BTreeMap<String, GroupCommit>,
    /// Groups changed (or deleted) since the last [`GroupTable::write_dirty`].
    dirty: BTreeSet<String>,
    /// Changed since the last [`GroupTable::publish`].
    unpublished: bool,
    view: watch::Sender<Arc<BTreeMap<String, GroupCommit>>>,
}

impl Default for GroupTable {
    fn default() -> Self {
        GroupTable::from_map(BTreeMap::new())
    }
}

fn key(group: &str) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(group.as_bytes());
    k
}

impl GroupTable {
    /// Loads the table a checkpoint wrote to `tree`.
    pub fn load(tree: &sled::Tree) -> Result<GroupTable> {
        let mut groups = BTreeMap::new();
        for item in tree.scan_prefix(KEY_PREFIX) {
            let (k, v) = item?;
            let state = GroupCommit::decode(&v[..]).map_err(|e| {
                BrokerError::Storage(format!("corrupt group state under {k:?}: {e}"))
            })?;
            groups.insert(state.group.clone(), state);
        }
        Ok(GroupTable::from_map(groups))
    }

    fn from_map(groups: BTreeMap<String, GroupCommit>) -> GroupTable {
        let (view, _) = watch::channel(Arc::new(groups.clone()));
        GroupTable {
            groups,
            dirty: BTreeSet::new(),
            unpublished: false,
            view,
        }
    }

    /// The readers' view; see [`GroupView`].
    pub fn view(&self) -> GroupView {
        self.view.subscribe()
    }

    /// Shows readers the changes applied since the last call (once per
    /// apply round: it copies the table, which holds a few groups).
    pub fn publish(&mut self) {
        if std::mem::take(&mut self.unpublished) {
            self.view.send_replace(Arc::new(self.groups.clone()));
        }
    }

    /// A group's progress, if it has any on this partition.
    pub fn get(&self, group: &str) -> Option<&GroupCommit> {
        self.groups.get(group)
    }

    /// Every group with progress on this partition, by name.
    pub fn iter(&self) -> impl Iterator<Item = &GroupCommit> {
        self.groups.values()
    }

    /// Applies a committed group entry, or refuses it (the same way on
    /// every replica: the outcome depends only on the entry and `log`).
    pub fn apply(&mut self, entry: GroupEntry, log: LogBounds) -> Result<()> {
        validate_group_name(entry.group()).map_err(BrokerError::InvalidRequest)?;
        match entry {
            GroupEntry::Commit(c) => self.commit(c, log)?,
            GroupEntry::Reset(r) => {
                if r.offset > log.next_offset {
                    return Err(BrokerError::OffsetOutOfRange {
                        requested: r.offset,
                        start: log.start_offset,
                        end: log.next_offset,
                    });
                }
                let state = GroupCommit {
                    group: r.group.clone(),
                    committed: r.offset,
                    deliveries: Vec::new(),
                };
                self.groups.insert(r.group.clone(), state);
                self.dirty.insert(r.group);
                self.unpublished = true;
            }
            GroupEntry::Delete(d) => {
                self.groups.remove(&d.group);
                self.dirty.insert(d.group);
                self.unpublished = true;
            }
        }
        Ok(())
    }

    fn commit(&mut self, c: GroupCommit, log: LogBounds) -> Result<()> {
        if c.committed > log.next_offset {
            return Err(BrokerError::OffsetOutOfRange {
                requested: c.committed,
                start: log.start_offset,
                end: log.next_offset,
            });
        }
        check_deliveries(&c.deliveries, log)?;
        let committed = self
            .groups
            .get(&c.group)
            .map_or(c.committed, |s| s.committed.max(c.committed));
        let deliveries: Vec<Delivery> = c
            .deliveries
            .into_iter()
            .filter(|d| d.offset >= committed)
            .collect();
        self.dirty.insert(c.group.clone());
        self.unpublished = true;
        self.groups.insert(
            c.group.clone(),
            GroupCommit {
                group: c.group,
                committed,
                deliveries,
            },
        );
        Ok(())
    }

    /// Adds the groups changed since the last call to `pending`.
    pub fn write_dirty(&mut self, pending: &mut sled::Batch) {
        for group in std::mem::take(&mut self.dirty) {
            match self.groups.get(&group) {
                Some(state) => pending.insert(key(&group), state.encode_to_vec()),
                None => pending.remove(key(&group)),
            }
        }
    }

    /// The table for a snapshot.
    pub fn snapshot(&self) -> Vec<GroupCommit> {
        self.groups.values().cloned().collect()
    }

    /// Replaces the table with a snapshot's (the caller has cleared the
    /// tree), writing it to `pending`. Entries that do not validate are
    /// skipped: a snapshot comes from a replica that applied them.
    pub fn restore(&mut self, states: &[GroupCommit], pending: &mut sled::Batch) {
        self.groups.clear();
        self.dirty.clear();
        self.unpublished = true;
        for s in states {
            if validate_group_name(&s.group).is_err() || s.deliveries.len() > MAX_DELIVERIES {
                tracing::warn!(group = %s.group, "snapshot holds an invalid group entry; skipped");
                continue;
            }
            pending.insert(key(&s.group), s.encode_to_vec());
            self.groups.insert(s.group.clone(), s.clone());
        }
    }
}

/// Delivery counts must be in increasing offset order, each offset once,
/// within the log, each count at least 1, and at most [`MAX_DELIVERIES`].
fn check_deliveries(deliveries: &[Delivery], log: LogBounds) -> Result<()> {
    if deliveries.len() > MAX_DELIVERIES {
        return Err(BrokerError::InvalidRequest(format!(
            "{} delivery counts, the limit is {MAX_DELIVERIES}",
            deliveries.len()
        )));
    }
    let mut previous: Option<u64> = None;
    for d in deliveries {
        if d.count == 0 {
            return Err(BrokerError::InvalidRequest(format!(
                "delivery count 0 for offset {}",
                d.offset
            )));
        }
        if d.offset >= log.next_offset {
            return Err(BrokerError::OffsetOutOfRange {
                requested: d.offset,
                start: log.start_offset,
                end: log.next_offset,
            });
        }
        if previous.is_some_and(|p| d.offset <= p) {
            return Err(BrokerError::InvalidRequest(format!(
                "delivery counts out of order at offset {}",
                d.offset
            )));
        }
        previous = Some(d.offset);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: LogBounds = LogBounds {
        start_offset: 10,
        next_offset: 100,
    };

    fn commit(group: &str, committed: u64, deliveries: &[(u64, u32)]) -> GroupEntry {
        GroupEntry::Commit(GroupCommit {
            group: group.into(),
            committed,
            deliveries: deliveries
                .iter()
                .map(|&(offset, count)| Delivery { offset, count })
                .collect(),
        })
    }

    fn reset(group: &str, offset: u64) -> GroupEntry {
        GroupEntry::Reset(GroupReset {
            group: group.into(),
            offset,
        })
    }

    fn delete(group: &str) -> GroupEntry {
        GroupEntry::Delete(GroupDelete {
            group: group.into(),
        })
    }

    fn committed(t: &GroupTable, group: &str) -> Option<u64> {
        t.get(group).map(|s| s.committed)
    }

    #[test]
    fn a_commit_never_moves_the_offset_back_and_keeps_counts_beyond_it() {
        let mut t = GroupTable::default();
        t.apply(commit("g", 40, &[(40, 1), (41, 3)]), LOG).unwrap();
        assert_eq!(committed(&t, "g"), Some(40));
        // Late commit from before: the offset stays, its counts below the
        // committed offset are dropped.
        t.apply(commit("g", 20, &[(20, 2), (45, 2)]), LOG).unwrap();
        let s = t.get("g").unwrap();
        assert_eq!(s.committed, 40);
        assert_eq!(
            s.deliveries,
            vec![Delivery {
                offset: 45,
                count: 2
            }]
        );
        t.apply(commit("g", 50, &[]), LOG).unwrap();
        assert_eq!(committed(&t, "g"), Some(50));
        assert!(t.get("g").unwrap().deliveries.is_empty());
    }

    #[test]
    fn only_a_reset_moves_back_and_it_forgets_the_counts() {
        let mut t = GroupTable::default();
        t.apply(commit("g", 60, &[(61, 4)]), LOG).unwrap();
        t.apply(reset("g", 12), LOG).unwrap();
        let s = t.get("g").unwrap();
        assert_eq!((s.committed, s.deliveries.len()), (12, 0));
        // Below the log's start is kept (not clamped: see the module
        // docs); the high watermark is a valid target (to-latest); beyond
        // it is refused.
        t.apply(reset("g", 0), LOG).unwrap();
        assert_eq!(committed(&t, "g"), Some(0));
        t.apply(reset("g", 100), LOG).unwrap();
        assert_eq!(committed(&t, "g"), Some(100));
        let err = t.apply(reset("g", 101), LOG).unwrap_err();
        assert!(matches!(err, BrokerError::OffsetOutOfRange { .. }), "{err}");
        assert_eq!(committed(&t, "g"), Some(100));
    }

    #[test]
    fn invalid_commits_are_refused_and_change_nothing() {
        let mut t = GroupTable::default();
        t.apply(commit("g", 30, &[]), LOG).unwrap();
        let bad = [
            commit("g", 101, &[]),
            commit("g", 40, &[(50, 0)]),
            commit("g", 40, &[(50, 1), (50, 1)]),
            commit("g", 40, &[(51, 1), (50, 1)]),
            commit("g", 40, &[(100, 1)]),
            commit("", 40, &[]),
            commit("a/b", 40, &[]),
        ];
        for entry in bad {
            assert!(t.apply(entry.clone(), LOG).is_err(), "{entry:?}");
        }
        assert_eq!(committed(&t, "g"), Some(30));
        assert_eq!(t.iter().count(), 1);
        let too_many: Vec<(u64, u32)> = (0..=MAX_DELIVERIES as u64).map(|o| (o, 1)).collect();
        let log = LogBounds {
            start_offset: 0,
            next_offset: u64::MAX,
        };
        assert!(t.apply(commit("g", 0, &too_many), log).is_err());
    }

    #[test]
    fn entries_round_trip_and_batches_are_not_entries() {
        for entry in [commit("g", 7, &[(8, 2)]), reset("g", 3), delete("g")] {
            let (context, data) = entry.encode();
            assert_eq!(GroupEntry::decode(context, &data).unwrap(), Some(entry));
        }
        assert_eq!(GroupEntry::decode(b"", b"any batch bytes").unwrap(), None);
        assert!(GroupEntry::decode(b"zz", b"").is_err());
        assert!(GroupEntry::decode(CONTEXT_COMMIT, &[0xff; 16]).is_err());
        assert!(GroupEntry::decode(CONTEXT_COMMIT, &vec![0; MAX_ENTRY_BYTES + 1]).is_err());
    }

    /// Replaying the entries after a snapshot's applied index over a table
    /// taken later (the current one) ends where the log did.
    #[test]
    fn replay_over_a_later_table_converges() {
        let history = [
            commit("a", 20, &[(21, 1)]),
            commit("b", 30, &[]),
            reset("a", 15),
            commit("a", 18, &[(19, 2)]),
            delete("b"),
            commit("b", 12, &[]),
            commit("a", 17, &[]),
        ];
        for split in 0..=history.len() {
            let mut full = GroupTable::default();
            for e in &history {
                full.apply(e.clone(), LOG).unwrap();
            }
            let mut replayed = GroupTable::default();
            let mut pending = sled::Batch::default();
            replayed.restore(&full.snapshot(), &mut pending);
            for e in &history[split..] {
                replayed.apply(e.clone(), LOG).unwrap();
            }
            assert_eq!(replayed.snapshot(), full.snapshot(), "split at {split}");
        }
    }

    #[test]
    fn checkpoints_write_changes_and_deletions() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("p").unwrap();
        let mut t = GroupTable::default();
        t.apply(commit("a", 20, &[(21, 1)]), LOG).unwrap();
        t.apply(commit("b", 30, &[]), LOG).unwrap();
        let mut batch = sled::Batch::default();
        t.write_dirty(&mut batch);
        tree.apply_batch(batch).unwrap();
        assert_eq!(GroupTable::load(&tree).unwrap().snapshot(), t.snapshot());
        t.apply(delete("a"), LOG).unwrap();
        let mut batch = sled::Batch::default();
        t.write_dirty(&mut batch);
        tree.apply_batch(batch).unwrap();
        let loaded = GroupTable::load(&tree).unwrap();
        assert_eq!(loaded.snapshot(), t.snapshot());
        assert_eq!(committed(&loaded, "a"), None);
        assert_eq!(committed(&loaded, "b"), Some(30));
    }
}
