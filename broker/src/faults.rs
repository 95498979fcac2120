//! A replica whose storage fails is taken out of service, not the node.
//!
//! raft-rs panics when its storage returns anything but "compacted" or
//! "unavailable" (a frame whose checksum fails, an I/O error reading the
//! log), and our own code returns storage errors. Either used to end the
//! driver thread, and the node crash-looped on the same bad frame. Now
//! every call into one group runs under [`guard`]: a failure takes that
//! group out of service on this node ([`Driver::quarantine`]), reported in
//! the log and by `cluster status` (role `faulted`), and every other group
//! keeps serving.
//!
//! A faulted replica that has peers is rebuilt from them
//! ([`Driver::rebuild`]): its directory is destroyed and it restarts as an
//! empty replica with the same voters, keeping its term and vote so it
//! never votes twice in a term. Until its log reaches the last index it held
//! before (every entry it may have acknowledged), it refuses to vote
//! (`vote_barrier`): with an empty log it would otherwise help elect a
//! leader that lacks entries it had helped commit. A replica without peers
//! (replication factor 1) cannot be rebuilt and stays out of service; its
//! data needs an operator.
//!
//! A failed `fdatasync` is not handled here: after one, the page cache can
//! no longer be trusted, and the node stops (as PostgreSQL does).

use std::panic::{catch_unwind, AssertUnwindSafe};

use raft::prelude::{HardState, MessageType};

use crate::catalog::LocalReplica;
use crate::driver::{Driver, META_GROUP};
use crate::error::{BrokerError, Result};
use crate::group::{Bootstrap, Group, Machine};
use crate::state::partition::PartitionState;

/// Runs `f`, turning an error or a panic into the reason a group failed.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    }
}

impl Driver {
    /// Takes group `id` out of service after a failure, and rebuilds it from
    /// its peers when it has any.
    pub(crate) fn quarantine(&mut self, id: u64, reason: String) {
        let Some(mut g) = self.groups.remove(&id) else {
            return;
        };
        tracing::error!(group = id, %reason, "replica out of service");
        let err = BrokerError::ReplicaFaulted {
            group: id,
            reason: reason.clone(),
        };
        // The state may be half updated after a panic: read only plain data.
        let facts = guard(|| {
            g.fail_all(err);
            let _ = g.leader.send((0, 0));
            Ok((
                g.voters(),
                g.storage.hard_state(),
                g.node.raft.raft_log.last_index(),
            ))
        });
        drop(g);
        self.faulted.insert(id, reason);
        let me = self.config.node_id;
        let Ok((voters, hs, last)) = facts else {
            return;
        };
        if id == META_GROUP || !voters.iter().any(|&v| v != me) {
            tracing::error!(
                group = id,
                "replica has no peers to be rebuilt from; it stays out of service"
            );
            return;
        }
        match self.rebuild(id, &voters, &hs, last) {
            Ok(()) => {
                self.faulted.remove(&id);
            }
            Err(e) => tracing::error!(group = id, error = %e, "rebuilding the replica failed"),
        }
    }

    /// Recreates partition group `id` empty, to be filled by its leader.
    fn rebuild(&mut self, id: u64, voters: &[u64], hs: &HardState, barrier: u64) -> Result<()> {
        tracing::warn!(
            group = id,
            ?voters,
            barrier,
            "rebuilding the replica from its peers"
        );
        let dir = self.group_dir(id);
        covet_raft_store::destroy(&dir)?;
        Group::bootstrap_replica(&dir, self.config.log_options, voters, hs)?;
        let mut state = PartitionState::open(self.db.open_tree(format!("p{id}"))?)?;
        state.reset()?;
        let (index, progress) = (state.index(), state.subscribe());
        let bootstrap = Bootstrap {
            voters: voters.to_vec(),
            preferred_leader: 0,
        };
        let mut group = self.open_group(id, Machine::Partition(state), &bootstrap)?;
        group.vote_barrier = Some(barrier);
        self.catalog.set_local(
            id,
            LocalReplica {
                storage: group.storage.clone(),
                index,
                progress,
                leader: group.leader.subscribe(),
            },
        );
        self.groups.insert(id, group);
        Ok(())
    }
}

/// Whether a message asks for a vote.
pub(crate) fn is_vote_request(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    )
}
