//! Each Raft group's state as this node sees it, for `covet cluster status`.

use covet_protocol::api::{GroupStatus, ReplicaProgress};
use raft::{ProgressState, StateRole};

use crate::driver::Driver;
use crate::group::Group;

impl Driver {
    /// One entry per group this node holds, sorted by group id.
    pub(crate) fn status(&self) -> Vec<GroupStatus> {
        let names = self.group_names();
        let mut out: Vec<GroupStatus> = self
            .groups
            .values()
            .map(|g| {
                let (topic, partition) = names.get(&g.id).cloned().unwrap_or_default();
                group_status(g, topic, partition)
            })
            .collect();
        for (&group, reason) in &self.faulted {
            let (topic, partition) = names.get(&group).cloned().unwrap_or_default();
            out.push(GroupStatus {
                group,
                topic,
                partition,
                role: "faulted".into(),
                fault: reason.clone(),
                ..Default::default()
            });
        }
        out.sort_by_key(|s| s.group);
        out
    }

    /// Topic and partition of each partition group.
    fn group_names(&self) -> std::collections::HashMap<u64, (String, u32)> {
        let mut names = std::collections::HashMap::new();
        for t in self.catalog.topics() {
            for p in &t.partitions {
                names.insert(p.group, (t.record.name.clone(), p.partition));
            }
        }
        names
    }
}

fn group_status(g: &Group, topic: String, partition: u32) -> GroupStatus {
    let r = &g.node.raft;
    // Status is answered between rounds, when every hard state the last
    // round wrote is synced.
    let synced = g.storage.hard_state();
    let last_index = r.raft_log.last_index();
    let role = match r.state {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    };
    let replicas = if r.state == StateRole::Leader {
        let mut v: Vec<ReplicaProgress> = r
            .prs()
            .iter()
            .map(|(&node, pr)| ReplicaProgress {
                node,
                active: pr.recent_active || node == r.id,
                matched: pr.matched,
                lag: last_index.saturating_sub(pr.matched),
                state: match pr.state {
                    ProgressState::Probe => "probe",
                    ProgressState::Replicate => "replicate",
                    ProgressState::Snapshot => "snapshot",
                }
                .to_string(),
            })
            .collect();
        v.sort_by_key(|p| p.node);
        v
    } else {
        Vec::new()
    };
    GroupStatus {
        group: g.id,
        topic,
        partition,
        role: role.to_string(),
        leader: r.leader_id,
        term: r.term,
        commit: r.raft_log.committed,
        applied: r.raft_log.applied,
        last_index,
        replicas,
        fault: String::new(),
        persisted_term: synced.term,
        persisted_vote: synced.vote,
        acked: if r.state == StateRole::Leader {
            r.raft_log.persisted
        } else if g.acked_term == synced.term {
            g.acked
        } else {
            0
        },
    }
}
