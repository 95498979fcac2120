//! The consumer-group coordinator (ADR 0009): on the metadata leader,
//! members join, heartbeat and leave; the coordinator keeps their sessions
//! in memory, plans the assignment ([`crate::consumer::assign`]) and
//! records every change of membership or assignment in the metadata group
//! (a `ConsumerGroupRecord`), never a heartbeat.
//!
//! A member learns what it may consume (and the generation to open its
//! partition sessions with) from each heartbeat's answer, and reports what
//! it holds. A partition counts as the member's from the moment it is
//! granted until a heartbeat the member sent after learning of the grant
//! does not report it (even if a later plan moved it away before that
//! heartbeat), so a moving partition reaches its new owner only after the
//! old one released it.
//!
//! A new metadata leader takes the groups over from the records: every
//! recorded member gets one full session timeout to heartbeat, and is
//! taken to hold what it was granted until it reports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covet_protocol::api::{
    HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, MemberAssignment, TopicPartition,
};
use covet_protocol::internal::{AssignedPartition, ConsumerGroupMember, ConsumerGroupRecord};
use covet_protocol::topic::validate_group_name;
use tokio::sync::watch;

use crate::consumer::assign::{self, Assignment, Member, Partition};
use crate::driver::NodeHandle;
use crate::error::{BrokerError, Result};
use crate::state::meta::set_consumer_group_command;

const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_SESSION_TIMEOUT: Duration = Duration::from_secs(300);
/// How often expired members are looked for.
pub const EXPIRY_CHECK: Duration = Duration::from_millis(100);
/// A member's heartbeat interval while a rebalance is under way.
const IN_TRANSIT_HEARTBEAT: Duration = Duration::from_millis(50);
/// Most members of one group.
const MAX_MEMBERS: usize = 1000;

struct MemberState {
    topics: BTreeSet<String>,
    session_timeout: Duration,
    last_seen: Instant,
    /// What the member last reported holding.
    reported: BTreeSet<Partition>,
    /// What the last answer said it may consume. It may hold those until
    /// its next heartbeat, which reports them, even if a later plan moved
    /// them away meanwhile (it may already be consuming them).
    answered: BTreeSet<Partition>,
}

impl MemberState {
    /// What the member may hold besides what it is granted now.
    fn held(&self) -> BTreeSet<Partition> {
        self.reported.union(&self.answered).cloned().collect()
    }
}

#[derive(Default)]
struct GroupState {
    generation: u64,
    members: BTreeMap<String, MemberState>,
    target: Assignment,
    now: Assignment,
}

/// Groups as this coordinator leads them, for one metadata term.
#[derive(Default)]
struct Leading {
    term: u64,
    groups: BTreeMap<String, GroupState>,
}

pub struct Coordinator {
    node: NodeHandle,
    state: tokio::sync::Mutex<Leading>,
    next_member: AtomicU64,
    /// Distinguishes member ids minted by coordinators in different
    /// processes.
    epoch: u64,
}

fn partitions_of(list: &[AssignedPartition]) -> BTreeSet<Partition> {
    list.iter()
        .map(|p| Partition::new(p.topic.clone(), p.partition))
        .collect()
}

fn assigned(set: &BTreeSet<Partition>) -> Vec<AssignedPartition> {
    set.iter()
        .map(|p| AssignedPartition {
            topic: p.topic.clone(),
            partition: p.index,
        })
        .collect()
}

impl Coordinator {
    pub fn new(node: NodeHandle) -> Coordinator {
        Coordinator {
            node,
            state: tokio::sync::Mutex::default(),
            next_member: AtomicU64::new(1),
            epoch: crate::now_ms() as u64,
        }
    }

    /// The groups, if this node leads the metadata group; loaded from the
    /// records when it has just become leader.
    async fn lead(&self) -> Result<tokio::sync::MutexGuard<'_, Leading>> {
        let (leader, term) = self.node.catalog.meta_leader();
        if leader != self.node.node_id {
            return Err(BrokerError::NotLeader {
                leader_hint: leader,
            });
        }
        let mut state = self.state.lock().await;
        if state.term != term {
            let now = Instant::now();
            let groups = self
                .node
                .catalog
                .consumer_groups()
                .values()
                .map(|r| (r.name.clone(), taken_over(r, now)))
                .collect();
            *state = Leading { term, groups };
        }
        Ok(state)
    }

    pub async fn join(&self, req: JoinGroupRequest) -> Result<MemberAssignment> {
        validate_group_name(&req.group).map_err(BrokerError::InvalidRequest)?;
        if req.topics.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a member must subscribe to at least one topic".into(),
            ));
        }
        let session_timeout = match req.session_timeout_ms {
            0 => DEFAULT_SESSION_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        if !(MIN_SESSION_TIMEOUT..=MAX_SESSION_TIMEOUT).contains(&session_timeout) {
            return Err(BrokerError::InvalidRequest(format!(
                "session timeout must be between {MIN_SESSION_TIMEOUT:?} and {MAX_SESSION_TIMEOUT:?}"
            )));
        }
        let mut state = self.lead().await?;
        let group = state.groups.entry(req.group.clone()).or_default();
        if group.members.len() >= MAX_MEMBERS {
            return Err(BrokerError::InvalidRequest(format!(
                "group {} has {MAX_MEMBERS} members, the limit",
                req.group
            )));
        }
        let id = format!(
            "{}-{:x}-{}",
            self.node.node_id,
            self.epoch,
            self.next_member.fetch_add(1, Ordering::Relaxed)
        );
        group.members.insert(
            id.clone(),
            MemberState {
                topics: req.topics.iter().cloned().collect(),
                session_timeout,
                last_seen: Instant::now(),
                reported: BTreeSet::new(),
                answered: BTreeSet::new(),
            },
        );
        self.settle(&req.group, group).await?;
        Ok(answer(group, &id))
    }

    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<MemberAssignment> {
        let mut state = self.lead().await?;
        let group = state
            .groups
            .get_mut(&req.group)
            .filter(|g| g.members.contains_key(&req.member_id))
            .ok_or_else(|| unknown_member(&req.group, &req.member_id))?;
        let member = group
            .members
            .get_mut(&req.member_id)
            .ok_or_else(|| unknown_member(&req.group, &req.member_id))?;
        member.last_seen = Instant::now();
        let reported: BTreeSet<Partition> = req
            .owned
            .iter()
            .map(|p| Partition::new(p.topic.clone(), p.partition))
            .collect();
        // The member applied the last answer before this heartbeat (a
        // member's heartbeats and the application of their answers take
        // turns), so its report now covers what that answer granted.
        let let_go = !member.answered.is_subset(&reported);
        member.answered.clear();
        if member.reported != reported || let_go {
            member.reported = reported;
            self.settle(&req.group, group).await?;
        }
        Ok(answer(group, &req.member_id))
    }

    pub async fn leave(&self, req: LeaveGroupRequest) -> Result<()> {
        let mut state = self.lead().await?;
        let Some(group) = state.groups.get_mut(&req.group) else {
            return Ok(());
        };
        if group.members.remove(&req.member_id).is_some() {
            self.settle(&req.group, group).await?;
        }
        Ok(())
    }

    /// Removes the members whose session timed out, and reassigns.
    pub async fn expire(&self) -> Result<()> {
        let mut state = self.lead().await?;
        let now = Instant::now();
        let names: Vec<String> = state.groups.keys().cloned().collect();
        for name in names {
            let Some(group) = state.groups.get_mut(&name) else {
                continue;
            };
            let before = group.members.len();
            group
                .members
                .retain(|_, m| now.duration_since(m.last_seen) <= m.session_timeout);
            if group.members.len() != before {
                tracing::info!(group = %name, expired = before - group.members.len(),
                    "consumer group members timed out");
                self.settle(&name, group).await?;
            }
        }
        Ok(())
    }

    /// Replans `group` and, if the plan changed, raises its generation and
    /// records it in the metadata group.
    async fn settle(&self, name: &str, group: &mut GroupState) -> Result<()> {
        let topics: BTreeSet<&String> = group.members.values().flat_map(|m| &m.topics).collect();
        let partitions: BTreeMap<String, u32> = topics
            .into_iter()
            .filter_map(|t| {
                let handle = self.node.catalog.topic(t).ok()?;
                Some((t.clone(), handle.partitions.len() as u32))
            })
            .collect();
        let members: Vec<Member> = group
            .members
            .iter()
            .map(|(id, m)| Member {
                id: id.clone(),
                topics: m.topics.clone(),
            })
            .collect();
        // A partition is a member's from its grant until a heartbeat sent
        // after the member learnt of the grant does not report it.
        let owned: Assignment = group
            .members
            .iter()
            .map(|(id, m)| {
                let mut held = m.held();
                if let Some(granted) = group.now.get(id) {
                    held.extend(granted.iter().cloned());
                }
                (id.clone(), held)
            })
            .collect();
        let plan = assign::plan(&assign::Input {
            members: &members,
            partitions: &partitions,
            owned: &owned,
            assigned: &group.target,
        });
        let members_changed = plan.now.keys().ne(group.now.keys());
        if plan.now == group.now && plan.target == group.target && !members_changed {
            return Ok(());
        }
        // Recorded before it is answered: a member never consumes under
        // a generation a new coordinator would not know.
        let generation = group.generation + 1;
        let record = ConsumerGroupRecord {
            name: name.to_string(),
            generation,
            members: group
                .members
                .iter()
                .map(|(id, m)| ConsumerGroupMember {
                    id: id.clone(),
                    topics: m.topics.iter().cloned().collect(),
                    session_timeout_ms: m.session_timeout.as_millis() as u32,
                    target: plan.target.get(id).map(assigned).unwrap_or_default(),
                    granted: plan.now.get(id).map(assigned).unwrap_or_default(),
                    held: assigned(&m.held()),
                })
                .collect(),
        };
        self.node.meta(set_consumer_group_command(record)).await?;
        group.generation = generation;
        group.target = plan.target;
        group.now = plan.now;
        Ok(())
    }

    /// Runs [`Coordinator::expire`] every [`EXPIRY_CHECK`] until shutdown.
    pub fn spawn_expiry(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_CHECK);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match self.expire().await {
                            Ok(()) | Err(BrokerError::NotLeader { .. }) => {}
                            Err(e) => tracing::debug!(error = %e, "consumer group expiry failed"),
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
        });
    }
}

/// A group as a new coordinator finds it in its record.
fn taken_over(r: &ConsumerGroupRecord, now: Instant) -> GroupState {
    let mut group = GroupState {
        generation: r.generation,
        ..Default::default()
    };
    for m in &r.members {
        let granted = partitions_of(&m.granted);
        let mut held = granted.clone();
        held.extend(partitions_of(&m.held));
        group.target.insert(m.id.clone(), partitions_of(&m.target));
        group.now.insert(m.id.clone(), granted.clone());
        group.members.insert(
            m.id.clone(),
            MemberState {
                topics: m.topics.iter().cloned().collect(),
                session_timeout: Duration::from_millis(u64::from(m.session_timeout_ms))
                    .clamp(MIN_SESSION_TIMEOUT, MAX_SESSION_TIMEOUT),
                last_seen: now,
                reported: held,
                answered: BTreeSet::new(),
            },
        );
    }
    group
}

/// The answer to member `id`, which it is then taken to hold until its
/// next heartbeat.
fn answer(group: &mut GroupState, id: &str) -> MemberAssignment {
    let granted = group.now.get(id).cloned().unwrap_or_default();
    let session_timeout = match group.members.get_mut(id) {
        Some(m) => {
            m.answered = granted;
            m.session_timeout
        }
        None => DEFAULT_SESSION_TIMEOUT,
    };
    MemberAssignment {
        member_id: id.to_string(),
        generation: group.generation,
        partitions: group
            .now
            .get(id)
            .into_iter()
            .flatten()
            .map(|p| TopicPartition {
                topic: p.topic.clone(),
                partition: p.index,
            })
            .collect(),
        heartbeat_interval_ms: heartbeat_interval(group, session_timeout).as_millis() as u32,
        session_timeout_ms: session_timeout.as_millis() as u32,
    }
}

/// How soon a member heartbeats again: a tenth of its session timeout
/// (100 ms to 3 s) while the group is settled, [`IN_TRANSIT_HEARTBEAT`]
/// while a partition is on its way between members, so that the old owner
/// reports the release and the new one learns of its grant without waiting
/// a whole interval each.
fn heartbeat_interval(group: &GroupState, session_timeout: Duration) -> Duration {
    let in_transit = group.target.iter().any(|(id, target)| {
        group
            .now
            .get(id)
            .map_or(!target.is_empty(), |now| now != target)
    });
    if in_transit {
        IN_TRANSIT_HEARTBEAT
    } else {
        (session_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(3))
    }
}

fn unknown_member(group: &str, member: &str) -> BrokerError {
    BrokerError::UnknownMember(format!(
        "member {member} is not in group {group} (timed out, or the group was taken over); join again"
    ))
}
