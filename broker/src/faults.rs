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
use crate::state::partition::{offsets_path, PartitionState};

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
        let mut state =
            PartitionState::open(self.db.open_tree(format!("p{id}"))?, offsets_path(&dir))?;
        state.reset()?;
        let (index, progress, groups) = (state.index(), state.subscribe(), state.group_view());
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
            groups,
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

/// Why `m` cannot come from a legitimate peer of `g`, if it cannot; such a
/// message is dropped before raft-rs sees it. raft-rs trusts its peers and
/// panics (`fatal!`) on claims no correct peer makes; caught by [`guard`],
/// a panic would still take the replica out of service and rebuild it, so
/// one forged message would be a denial of service. Until mutual TLS
/// authenticates peers (see `transport`), this is what stands between a
/// sender on the peer port and those panics:
///
/// - an append whose entries do not follow its `index` one by one (raft-rs
///   indexes them by position and appends after them, and panics when
///   that would rewrite a committed entry), or whose terms run backwards
///   or past the message's term;
/// - an append response claiming an index past the leader's log (the
///   leader would commit entries it does not hold);
/// - a snapshot whose configuration raft-rs cannot restore (no voters, a
///   node both voter and learner, or a joint configuration, which Covet
///   never uses), or any snapshot of the metadata group.
///
/// - proposals, leadership transfers and read-index requests, which only
///   ever come from this node itself.
///
/// A heartbeat whose commit index lies past this replica's log is not
/// dropped but loses its commit index (see [`clamp_heartbeat`]).
pub(crate) fn implausible(g: &Group, m: &Message) -> Option<&'static str> {
    let log = &g.node.raft.raft_log;
    match m.get_msg_type() {
        MessageType::MsgAppend => {
            let mut prev_term = m.log_term;
            for (i, e) in m.entries.iter().enumerate() {
                if m.index.checked_add(i as u64 + 1) != Some(e.index) {
                    return Some("append entries out of sequence");
                }
                if e.term < prev_term || e.term > m.term {
                    return Some("append entry terms out of order");
                }
                prev_term = e.term;
            }
            None
        }
        // Covet proposes, transfers leadership and reads only on the
        // leader itself, so raft-rs never forwards these to a peer. From a
        // peer, a proposal would put unvalidated entries in the log (an
        // empty one panics raft-rs), and a transfer names a sender that
        // may have no progress in the group (raft-rs unwraps it).
        MessageType::MsgPropose
        | MessageType::MsgTransferLeader
        | MessageType::MsgReadIndex
        | MessageType::MsgReadIndexResp => Some("a message type peers do not send"),
        MessageType::MsgAppendResponse if !m.reject && m.index > log.last_index() => {
            Some("append response past the log")
        }
        // The metadata log is never compacted and every replica starts at
        // the same bootstrap snapshot, so no leader sends one; installing
        // it would fail and take the node's metadata out of service.
        MessageType::MsgSnapshot if matches!(g.machine, Machine::Meta(_)) => {
            Some("snapshot for the metadata group")
        }
        MessageType::MsgSnapshot => {
            let cs = m.get_snapshot().get_metadata().get_conf_state();
            let invalid = cs.voters.is_empty()
                || cs.voters.iter().any(|v| cs.learners.contains(v))
                || !cs.voters_outgoing.is_empty()
                || !cs.learners_next.is_empty()
                || cs.auto_leave;
            invalid.then_some("snapshot with an invalid configuration")
        }
        _ => None,
    }
}

/// A heartbeat names the leader's commit index, capped at what the leader
/// knows this replica holds; one naming an index past this replica's log
/// makes raft-rs panic. That happens with a forged message, or with a
/// leader whose view of this replica is stale (the rebuilt replicas above):
/// the heartbeat still counts (it resets the election timer), but commits
/// nothing. Only an append that matched the log proves what is committed.
/// Returns whether the commit index was cut.
pub(crate) fn clamp_heartbeat(g: &Group, m: &mut Message) -> bool {
    let log = &g.node.raft.raft_log;
    if m.get_msg_type() == MessageType::MsgHeartbeat && m.commit > log.last_index() {
        m.commit = log.committed;
        return true;
    }
    false
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{Applied, GroupConfig, MAX_UNCOMMITTED_BYTES};
    use crate::logging::raft_logger;
    use bytes::Bytes;
    use raft::prelude::{ConfChangeType, ConfChangeV2, Entry};

    /// Opens replica 1 of a group with `voters` in `dir`.
    fn open(dir: &Path, voters: &[u64]) -> Group {
        let logger = raft_logger();
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .open()
            .expect("sled");
        let state = PartitionState::open(db.open_tree("p").expect("tree"), dir.join("offsets"))
            .expect("state");
        let cfg = GroupConfig {
            node_id: 1,
            log_options: Default::default(),
            logger: &logger,
            election_tick: 10,
            heartbeat_tick: 2,
            fixed_election_timeout: Some(10),
        };
        let bootstrap = Bootstrap {
            voters: voters.to_vec(),
            preferred_leader: 0,
        };
        Group::open(
            7,
            &dir.join("g"),
            Machine::Partition(state),
            &cfg,
            &bootstrap,
        )
        .expect("open")
    }

    struct Nowhere;
    impl Outbox for Nowhere {
        fn send(&self, _: u64, _: Message) -> bool {
            true
        }
    }

    /// Runs rounds until nothing is ready.
    fn settle(g: &mut Group) {
        for _ in 0..100 {
            let mut effects = Vec::new();
            match g.write_ready(&Nowhere, &mut effects).expect("round") {
                Some(rd) => {
                    g.storage.sync().expect("sync");
                    g.finish_ready(rd, &Nowhere, &mut effects).expect("finish");
                }
                None => return,
            }
        }
        panic!("group did not settle");
    }

    fn heartbeat(commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 2;
        m.to = 1;
        m.term = 100;
        m.commit = commit;
        m
    }

    #[test]
    fn a_heartbeat_committing_past_the_log_commits_nothing_and_does_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = open(dir.path(), &[1, 2]);
        // What raft-rs does with it unfiltered: a panic.
        let raw = guard(|| {
            let _ = g.node.step(heartbeat(u64::MAX / 2));
            Ok(())
        });
        assert!(raw.is_err(), "raft-rs accepted the forged heartbeat");
        let mut g = open(&dir.path().join("again"), &[1, 2]);
        let committed = g.node.raft.raft_log.committed;
        let mut m = heartbeat(u64::MAX / 2);
        assert!(implausible(&g, &m).is_none());
        assert!(clamp_heartbeat(&g, &mut m));
        let outcome = guard(|| {
            let _ = g.node.step(m);
            Ok(())
        });
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(g.node.raft.raft_log.committed, committed);
        // A heartbeat within the log is left alone.
        let mut fine = heartbeat(committed);
        assert!(!clamp_heartbeat(&g, &mut fine));
    }

    #[test]
    fn appends_responses_and_snapshots_no_peer_sends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = open(dir.path(), &[1, 2]);
        let entry = |index, term| Entry {
            index,
            term,
            ..Default::default()
        };
        let mut app = Message::default();
        app.set_msg_type(MessageType::MsgAppend);
        app.from = 2;
        app.term = 9;
        app.index = 5;
        app.log_term = 5;
        app.set_entries(vec![entry(6, 6), entry(7, 9)].into());
        assert!(implausible(&g, &app).is_none(), "a legitimate append");
        let mut gap = app.clone();
        gap.set_entries(vec![entry(6, 6), entry(8, 9)].into());
        assert!(implausible(&g, &gap).is_some());
        let mut behind = app.clone();
        behind.set_entries(vec![entry(5, 6)].into());
        assert!(implausible(&g, &behind).is_some());
        let mut wrapping = app.clone();
        wrapping.index = u64::MAX;
        wrapping.set_entries(vec![entry(0, 6)].into());
        assert!(implausible(&g, &wrapping).is_some());
        let mut future = app.clone();
        future.set_entries(vec![entry(6, 10)].into());
        assert!(implausible(&g, &future).is_some());
        let mut backwards = app.clone();
        backwards.set_entries(vec![entry(6, 7), entry(7, 6)].into());
        assert!(implausible(&g, &backwards).is_some());

        for ty in [
            MessageType::MsgPropose,
            MessageType::MsgTransferLeader,
            MessageType::MsgReadIndex,
        ] {
            let mut m = Message::default();
            m.set_msg_type(ty);
            m.from = 2;
            assert!(implausible(&g, &m).is_some(), "{ty:?}");
        }
        let mut heartbeat_response = Message::default();
        heartbeat_response.set_msg_type(MessageType::MsgHeartbeatResponse);
        assert!(implausible(&g, &heartbeat_response).is_none());

        let mut resp = Message::default();
        resp.set_msg_type(MessageType::MsgAppendResponse);
        resp.index = u64::MAX;
        assert!(implausible(&g, &resp).is_some());
        resp.reject = true;
        assert!(implausible(&g, &resp).is_none(), "rejections carry hints");

        let mut snap = Message::default();
        snap.set_msg_type(MessageType::MsgSnapshot);
        snap.mut_snapshot().mut_metadata().index = 100;
        assert!(implausible(&g, &snap).is_some(), "no voters");
        let cs = snap.mut_snapshot().mut_metadata().mut_conf_state();
        cs.voters = vec![1, 2];
        cs.learners = vec![2];
        assert!(implausible(&g, &snap).is_some(), "voter and learner");
        snap.mut_snapshot().mut_metadata().mut_conf_state().learners = vec![3];
        assert!(implausible(&g, &snap).is_none());
    }

    #[test]
    fn a_committed_change_removing_the_last_voter_is_skipped_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = open(dir.path(), &[1]);
        settle(&mut g);
        assert!(g.is_leader());
        let mut cc = ConfChangeV2::default();
        cc.set_changes(
            vec![raft_proto::new_conf_change_single(
                1,
                ConfChangeType::RemoveNode,
            )]
            .into(),
        );
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        assert!(g.propose_membership(cc, tx));
        settle(&mut g);
        match rx.try_recv() {
            Ok(Err(BrokerError::MembershipConflict(_))) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(g.voters(), vec![1]);
        assert!(!g.membership_pending());
        let applied = g.node.raft.raft_log.applied;
        drop(g);
        // Replay on restart skips it again.
        let mut g = open(dir.path(), &[1]);
        settle(&mut g);
        assert_eq!(g.voters(), vec![1]);
        assert!(g.node.raft.raft_log.applied >= applied);
        // The change was replayed (nothing was checkpointed), and raft-rs
        // does not campaign while a replayed change is unapplied: the lone
        // voter waits out an election timeout, then leads again.
        for _ in 0..100 {
            if g.is_leader() {
                break;
            }
            g.node.tick();
            settle(&mut g);
        }
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        assert!(g.propose(Bytes::new(), tx));
        settle(&mut g);
        assert!(rx.try_recv().is_ok(), "the group still commits");
    }

    #[test]
    fn a_leader_that_cannot_commit_refuses_proposals_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = open(dir.path(), &[1]);
        settle(&mut g);
        assert!(g.is_leader());
        // No round runs: nothing proposed commits, as if the followers
        // were gone.
        let chunk = Bytes::from(vec![7u8; 4 << 20]);
        let most = (MAX_UNCOMMITTED_BYTES as usize / chunk.len()) + 2;
        let mut refused = None;
        for i in 0..most {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            if !g.propose(chunk.clone(), tx) {
                refused = Some((i, rx.try_recv()));
                break;
            }
        }
        let Some((i, answer)) = refused else {
            panic!("{most} proposals of {} bytes accepted", chunk.len());
        };
        assert!(i as u64 * chunk.len() as u64 >= MAX_UNCOMMITTED_BYTES - chunk.len() as u64);
        match answer {
            Ok(Err(BrokerError::Timeout(_))) => {}
            other => panic!("expected a retriable refusal, got {other:?}"),
        }
        assert!(g.is_leader(), "it still leads");
        // Once what it holds commits, it accepts proposals again.
        settle(&mut g);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        assert!(g.propose(chunk, tx));
        settle(&mut g);
        assert!(matches!(
            rx.try_recv(),
            Ok(Ok(Applied::Batch { .. })) | Ok(Err(_))
        ));
    }
}
