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
//! (`vote_barrier`, kept in a `vote-barrier` file of the group directory
//! so a restart during the rebuild keeps it): with an empty log it would
//! otherwise help elect a leader that lacks entries it had helped commit. A replica without peers
//! (replication factor 1) cannot be rebuilt and stays out of service; its
//! data needs an operator.
//!
//! A failed `fdatasync` is not handled here: after one, the page cache can
//! no longer be trusted, and the node stops (as PostgreSQL does).

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use raft::prelude::{HardState, Message, MessageType};

use crate::catalog::LocalReplica;
use crate::driver::{Driver, META_GROUP};
use crate::error::{BrokerError, Result};
use crate::group::{Bootstrap, Group, Machine, Outbox};
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
            // A replica faulted again while rebuilding keeps its first
            // barrier: its old log's end is what it may have acknowledged.
            let last = g.node.raft.raft_log.last_index();
            let last = last.max(g.vote_barrier.unwrap_or(0));
            Ok((g.voters(), g.storage.hard_state(), last))
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
            Ok(local) => {
                self.catalog.set_local(id, local);
                self.faulted.remove(&id);
            }
            Err(e) => tracing::error!(group = id, error = %e, "rebuilding the replica failed"),
        }
    }

    /// A partition group whose replica failed to open: rebuilt from its
    /// peers when what it must not forget (term, vote, last index, voters)
    /// can still be read, else left out of service.
    pub(crate) fn rebuild_unopened(&mut self, id: u64, reason: String) -> Option<LocalReplica> {
        tracing::error!(group = id, %reason, "replica out of service");
        self.faulted.insert(id, reason);
        let dir = self.group_dir(id);
        let opts = self.config.log_options;
        let facts = guard(|| {
            let storage = covet_raft_store::GroupStorage::open(&dir, opts)?;
            let last = raft::Storage::last_index(&storage)
                .map_err(|e| BrokerError::Storage(e.to_string()))?;
            Ok((storage.conf_state().voters, storage.hard_state(), last))
        });
        let me = self.config.node_id;
        match facts {
            Ok((voters, hs, last)) if voters.iter().any(|&v| v != me) => {
                match self.rebuild(id, &voters, &hs, last) {
                    Ok(local) => {
                        self.faulted.remove(&id);
                        Some(local)
                    }
                    Err(e) => {
                        tracing::error!(group = id, error = %e, "rebuilding the replica failed");
                        None
                    }
                }
            }
            Ok(_) => {
                tracing::error!(
                    group = id,
                    "replica has no peers to be rebuilt from; it stays out of service"
                );
                None
            }
            Err(e) => {
                tracing::error!(group = id, error = %e, "cannot read what the replica must not forget; it stays out of service");
                None
            }
        }
    }

    /// Recreates partition group `id` empty, to be filled by its leader.
    fn rebuild(
        &mut self,
        id: u64,
        voters: &[u64],
        hs: &HardState,
        barrier: u64,
    ) -> Result<LocalReplica> {
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
        write_barrier(&dir, barrier)?;
        let group = self.open_group(id, Machine::Partition(state), &bootstrap)?;
        let local = LocalReplica {
            storage: group.storage.clone(),
            index,
            progress,
            leader: group.leader.subscribe(),
        };
        self.groups.insert(id, group);
        Ok(local)
    }
}

/// The file that keeps a rebuilt replica's vote barrier across restarts.
const BARRIER_FILE: &str = "vote-barrier";

/// Makes `barrier` durable in the group directory (temp, fsync, rename,
/// directory fsync) before the replica can hear from anyone.
fn write_barrier(dir: &Path, barrier: u64) -> Result<()> {
    let tmp = dir.join(format!("{BARRIER_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&barrier.to_le_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(BARRIER_FILE))?;
    covet_raft_store::sync_dir(dir)?;
    Ok(())
}

/// The vote barrier of a replica rebuilt earlier and not yet caught up.
pub(crate) fn read_barrier(dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(dir.join(BARRIER_FILE)).ok()?;
    Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// Lifts the barrier once the replica caught up.
pub(crate) fn clear_barrier(dir: &Path) -> Result<()> {
    match std::fs::remove_file(dir.join(BARRIER_FILE)) {
        Ok(()) => covet_raft_store::sync_dir(dir).map_err(Into::into),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Marks the message a rebuilt replica sends its leader (see
/// [`report_rebuild`]); raft-rs never sets a context on append responses.
const REBUILD_REPORT: &[u8] = b"covet:replica-rebuilt";
/// Ticks between two reports of a rebuilt replica.
const REPORT_EVERY_TICKS: u64 = 10;

/// Called every tick. A rebuilt replica tells its group's leader that its
/// log now ends at `last_index`, far behind what the leader may believe it
/// holds: a leader never lowers a follower's matched index, ignores its
/// rejections as stale, and sends heartbeats committing entries it does not
/// have, so the replica would never catch up. The leader answers by
/// removing it from the group, and its reconciliation adds it back at once
/// with fresh progress (the same path as a wiped node, ADR 0005).
pub(crate) fn report_rebuild(g: &mut Group, out: &dyn Outbox) {
    if g.vote_barrier.is_none() {
        return;
    }
    let r = &g.node.raft;
    if r.leader_id == 0 || r.leader_id == r.id {
        return;
    }
    g.rebuild_ticks += 1;
    if g.rebuild_ticks % REPORT_EVERY_TICKS != 1 {
        return;
    }
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppendResponse);
    m.to = r.leader_id;
    m.from = r.id;
    m.term = r.term;
    m.reject = true;
    m.reject_hint = r.raft_log.last_index();
    m.context = REBUILD_REPORT.to_vec().into();
    out.send(g.id, m);
}

/// Whether `m` is a rebuilt replica's report.
pub(crate) fn is_rebuild_report(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgAppendResponse && m.context.as_ref() == REBUILD_REPORT
}

/// What a replica behind a vote barrier lets through to raft-rs. It drops
/// vote requests until its log reaches the barrier (then lifts it), and it
/// takes no commit index from heartbeats: a leader whose progress for it
/// predates the rebuild would name entries it does not hold (raft-rs
/// panics on that), and only an append that matched its log proves which
/// entries are committed.
pub(crate) fn barrier_admits(g: &mut Group, m: &mut Message) -> bool {
    let Some(barrier) = g.vote_barrier else {
        return true;
    };
    if g.node.raft.raft_log.persisted >= barrier {
        tracing::info!(group = g.id, "rebuilt replica caught up; it votes again");
        match clear_barrier(g.storage.dir()) {
            Ok(()) => g.vote_barrier = None,
            Err(e) => tracing::warn!(group = g.id, error = %e, "vote barrier stays"),
        }
        return true;
    }
    match m.get_msg_type() {
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote => false,
        MessageType::MsgHeartbeat => {
            m.commit = m.commit.min(g.node.raft.raft_log.committed);
            true
        }
        _ => true,
    }
}

impl Driver {
    /// A leader hears that a follower was rebuilt: unless its progress
    /// already starts afresh (the follower was added back), it removes the
    /// follower, and `reconcile_replicas` adds it back.
    pub(crate) fn on_rebuild_report(&mut self, group: u64, m: &Message) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if !g.is_leader() || g.membership_pending() || !g.voters().contains(&m.from) {
            return;
        }
        let matched = g.node.raft.prs().get(m.from).map_or(0, |pr| pr.matched);
        if matched <= m.reject_hint {
            return;
        }
        tracing::warn!(
            group,
            follower = m.from,
            matched,
            its_last_index = m.reject_hint,
            "follower was rebuilt; removing it so that it is added back afresh"
        );
        let mut cc = raft::prelude::ConfChangeV2::default();
        let remove =
            raft_proto::new_conf_change_single(m.from, raft::prelude::ConfChangeType::RemoveNode);
        cc.set_changes(vec![remove].into());
        let (tx, _) = tokio::sync::oneshot::channel();
        g.propose_membership(cc, tx);
    }
}
