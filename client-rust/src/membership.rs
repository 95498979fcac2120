//! A member's side of consumer-group membership (ADR 0009): join at the
//! coordinator, then heartbeat in the background, reporting the
//! partitions held and applying each new assignment to the
//! [`AssignmentTarget`] (the group consumer's partition sessions), and
//! leave gracefully.
//!
//! The coordinator moves a partition only after its old owner stops
//! reporting it, so the loop heartbeats again at once after an assignment
//! released something: a rebalance takes about one heartbeat per step,
//! not one interval each. A member the coordinator no longer knows
//! (`UNKNOWN_MEMBER`: it was silent past its session timeout) drops its
//! partitions and joins again under a new id. Heartbeats that fail
//! otherwise (the coordinator's node lost, an election) are retried on the
//! next tick; the member keeps consuming meanwhile, and the partition
//! leaders fence it if the group moved on without it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::{Client, Error, Reason, Result};

/// What membership drives: the sessions that consume the partitions a
/// member is given.
pub trait AssignmentTarget: Send + Sync + 'static {
    /// Consumes exactly `partitions` from now on, opening sessions with
    /// `generation` for the new ones and closing (gracefully, acks
    /// committed) the ones left out before returning.
    fn assign(
        &self,
        generation: u64,
        partitions: Vec<(String, u32)>,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;

    /// The partitions with an open or closing session: what the member
    /// holds.
    fn owned(&self) -> Vec<(String, u32)>;
}

/// What the background loop shares with the handle.
struct Shared {
    member_id: String,
    generation: u64,
    partitions: Vec<(String, u32)>,
}

/// A member of a consumer group, heartbeating in the background.
pub struct Membership {
    client: Client,
    group: String,
    shared: Arc<Mutex<Shared>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    target: Arc<dyn AssignmentTarget>,
}

fn assigned(a: &covet_protocol::api::MemberAssignment) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = a
        .partitions
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect();
    v.sort();
    v
}

impl Membership {
    /// Joins `group` subscribed to `topics` and starts heartbeating;
    /// `target` gets the first assignment before this returns.
    pub async fn join(
        client: Client,
        group: &str,
        topics: Vec<String>,
        session_timeout: Duration,
        target: Arc<dyn AssignmentTarget>,
    ) -> Result<Membership> {
        let timeout_ms = u32::try_from(session_timeout.as_millis())
            .map_err(|_| Error::InvalidArgument("session timeout too long".into()))?;
        let a = client.join_group(group, &topics, timeout_ms).await?;
        target.assign(a.generation, assigned(&a)).await?;
        let shared = Arc::new(Mutex::new(Shared {
            member_id: a.member_id.clone(),
            generation: a.generation,
            partitions: assigned(&a),
        }));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(heartbeat_loop(
            client.clone(),
            group.to_string(),
            topics,
            timeout_ms,
            Duration::from_millis(u64::from(a.heartbeat_interval_ms.max(50))),
            Arc::clone(&shared),
            Arc::clone(&target),
            stopped,
        ));
        Ok(Membership {
            client,
            group: group.to_string(),
            shared,
            stop,
            task,
            target,
        })
    }

    /// The member's id (it changes if the member had to join again).
    pub async fn member_id(&self) -> String {
        self.shared.lock().await.member_id.clone()
    }

    /// The partitions assigned now, and the generation.
    pub async fn assignment(&self) -> (u64, Vec<(String, u32)>) {
        let s = self.shared.lock().await;
        (s.generation, s.partitions.clone())
    }

    /// Stops heartbeating, closes every session (committing what was
    /// acknowledged) and leaves the group, so the partitions move at once.
    pub async fn leave(self) -> Result<()> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let (generation, id) = {
            let s = self.shared.lock().await;
            (s.generation, s.member_id.clone())
        };
        let closed = self.target.assign(generation, Vec::new()).await;
        let left = self.client.leave_group(&self.group, &id).await;
        closed.and(left)
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    client: Client,
    group: String,
    topics: Vec<String>,
    timeout_ms: u32,
    mut interval: Duration,
    shared: Arc<Mutex<Shared>>,
    target: Arc<dyn AssignmentTarget>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut soon = false;
    loop {
        let wait = if soon {
            Duration::from_millis(10)
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return,
        }
        soon = false;
        let id = shared.lock().await.member_id.clone();
        let owned = target.owned();
        let answer = match client.heartbeat(&group, &id, &owned).await {
            Ok(a) => a,
            Err(e) if e.reason() == Some(Reason::UnknownMember) => {
                tracing::info!(%group, member = %id, "removed from the group; joining again");
                let generation = shared.lock().await.generation;
                if let Err(e) = target.assign(generation, Vec::new()).await {
                    tracing::warn!(%group, error = %e, "closing sessions before rejoining");
                }
                match client.join_group(&group, &topics, timeout_ms).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(%group, error = %e, "rejoining failed; retrying");
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%group, error = %e, "heartbeat failed; retrying");
                continue;
            }
        };
        interval = Duration::from_millis(u64::from(answer.heartbeat_interval_ms.max(50)));
        let partitions = assigned(&answer);
        let changed = {
            let s = shared.lock().await;
            s.member_id != answer.member_id
                || s.generation != answer.generation
                || s.partitions != partitions
        };
        // A session that ended on its own (fenced by a forced reset, or
        // failed) left an assigned partition unowned; the coordinator still
        // counts it as this member's, so only assigning again reopens it.
        let lost = partitions.iter().any(|p| !owned.contains(p));
        if changed || lost {
            if let Err(e) = target.assign(answer.generation, partitions.clone()).await {
                tracing::warn!(%group, error = %e, "applying the assignment failed");
            }
            let mut s = shared.lock().await;
            s.member_id = answer.member_id.clone();
            s.generation = answer.generation;
            s.partitions = partitions;
        }
        // Report at once what the assignment released (or what the
        // coordinator has yet to hear about), instead of a whole interval
        // later.
        let mut now_owned = target.owned();
        now_owned.sort();
        let mut reported = owned;
        reported.sort();
        soon = now_owned != reported;
    }
}

/// The group consumer's sessions are what membership drives.
impl AssignmentTarget for crate::Assigner {
    fn assign(
        &self,
        generation: u64,
        partitions: Vec<(String, u32)>,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(crate::Assigner::assign(self, generation, partitions))
    }

    fn owned(&self) -> Vec<(String, u32)> {
        crate::Assigner::owned(self)
    }
}
