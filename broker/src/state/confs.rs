//! A partition's membership history: the conf state that each applied
//! configuration change produced, by Raft index.
//!
//! A snapshot must carry the voters *as of its index*. Retention compacts at
//! an index that can lie before the latest membership change, and the
//! current voters are then wrong for the snapshot: a node removed and added
//! back after that index would be told it was never a member and reject the
//! snapshot it needs to catch up. So each applied change is recorded here,
//! in the partition's sled tree under `c` + index (u64 BE) → the encoded
//! `ConfState`, written before the applied index that covers it (sled keeps
//! the order of writes across a crash, so a change whose record was lost
//! has its applied index lost too, and is re-applied from the log). Entries
//! a snapshot covers are forgotten after the compaction: the stored
//! snapshot's conf state stands for them.

use protobuf::Message as _;
use raft::prelude::ConfState;

use crate::error::{BrokerError, Result};

const PREFIX: u8 = b'c';

fn key(index: u64) -> [u8; 9] {
    let mut k = [PREFIX; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Records the conf state a change at `index` produced.
pub fn record(tree: &sled::Tree, index: u64, cs: &ConfState) -> Result<()> {
    let bytes = cs
        .write_to_bytes()
        .map_err(|e| BrokerError::Internal(format!("encode conf state: {e}")))?;
    tree.insert(key(index), bytes)?;
    Ok(())
}

/// The conf state in force right after `index`, if a recorded change at or
/// before it says; `None` means the stored snapshot's conf state holds.
pub fn at(tree: &sled::Tree, index: u64) -> Result<Option<ConfState>> {
    match tree.range(key(0)..=key(index)).next_back() {
        Some(item) => {
            let (_, v) = item?;
            let cs = ConfState::parse_from_bytes(&v)
                .map_err(|e| BrokerError::Storage(format!("corrupt conf state record: {e}")))?;
            Ok(Some(cs))
        }
        None => Ok(None),
    }
}

/// Forgets the changes at or before `index` (a snapshot now covers them).
pub fn forget_through(tree: &sled::Tree, index: u64) -> Result<()> {
    let mut batch = sled::Batch::default();
    for item in tree.range(key(0)..=key(index)) {
        batch.remove(item?.0);
    }
    tree.apply_batch(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(voters: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn answers_the_state_as_of_an_index() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("p").unwrap();
        assert_eq!(at(&tree, 100).unwrap(), None);
        record(&tree, 10, &cs(&[1, 2])).unwrap();
        record(&tree, 20, &cs(&[1, 2, 3])).unwrap();
        assert_eq!(at(&tree, 9).unwrap(), None);
        assert_eq!(at(&tree, 10).unwrap(), Some(cs(&[1, 2])));
        assert_eq!(at(&tree, 19).unwrap(), Some(cs(&[1, 2])));
        assert_eq!(at(&tree, 25).unwrap(), Some(cs(&[1, 2, 3])));
        forget_through(&tree, 15).unwrap();
        assert_eq!(at(&tree, 19).unwrap(), None);
        assert_eq!(at(&tree, 20).unwrap(), Some(cs(&[1, 2, 3])));
    }
}
