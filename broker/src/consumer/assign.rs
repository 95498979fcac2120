//! Sticky, cooperative assignment of partitions to a group's members: the
//! consumer-group coordinator's algorithm (ADR 0009, "Coordination"), pure:
//! no I/O, no clock, the same input always gives the same [`Plan`].
//!
//! [`plan`] takes the live members (with the topics each subscribes to),
//! the topics that exist, what each member owns and the previous plan's
//! target, and returns two assignments:
//!
//! - **`target`**, where the group is heading. Every partition of a topic
//!   that some member subscribes to is in exactly one member's target, and
//!   that member subscribes to the topic. Partitions of topics that no
//!   longer exist, beyond a topic's partition count or of topics nobody
//!   subscribes to are in no target.
//! - **`now`**, what each member may consume in this generation: its target
//!   minus every partition another live member still owns.
//!
//! # Stickiness
//!
//! A partition stays with its *holder*: the one live member subscribed to
//! its topic that owns it or, when none or several do, the one such member
//! the previous target gave it to (so that a plan rerun while a move is
//! under way keeps its course). Partitions without a holder go, in order,
//! to the subscriber with the fewest partitions. Then, while some member
//! has at least two more partitions than a subscriber of one of its
//! topics, one partition moves from the fullest such member to the
//! emptiest such subscriber. Among donors as full, the one solely owning
//! fewest of its partitions gives first; it gives first a partition it
//! does not solely own, then one the previous target gave the receiver; other ties go
//! by member id and partition. Each move lowers the sum of the squared
//! counts, so this ends.
//!
//! # Balance
//!
//! Guaranteed: no single move narrows a gap. For every partition in member
//! `a`'s target and every member `b` subscribed to its topic,
//! `len(b) + 1 >= len(a)` (sizes of their targets). With identical
//! subscriptions every member can take every partition, so the sizes differ
//! by at most one overall, and no such plan moves fewer owned partitions:
//! each member keeps what it solely owns up to its share, and the shares
//! one above the floor go to the members owning most. With different
//! subscriptions a chain of moves through a third member could sometimes
//! narrow the spread further; that is not attempted. Balance is by count
//! across topics, not per topic.
//!
//! # Why revoke first
//!
//! A partition that moves from `a` to `b` leaves `a`'s `now` at once, but
//! enters `b`'s `now` only when no other live member owns it: `a` reported
//! it released (after committing and closing its session), or `a` left the
//! live members. Members keep what they keep throughout: a partition in
//! both a member's target and its sole ownership is in its `now`. So as
//! long as no member is declared dead, no partition is ever in two
//! members' hands at once, even when their reports disagree (both lose a
//! partition both claim until one lets go). A member declared dead while
//! it still consumes is the at-least-once case: the partition leader fences
//! its session by the new generation.
//!
//! This holds only if `owned` covers everything a member may be consuming:
//! the coordinator must count a partition as owned by a member from the
//! moment it grants it (in `now`) until the member reports it released,
//! not just what the member last reported.
//!
//! # Convergence
//!
//! Feeding a plan back (`owned := now`, `assigned := target`) gives the
//! same target, and then `now == target`: every partition's holder is where
//! the target put it, a balanced target makes no move, and nobody owns what
//! another is granted. Feeding that back changes nothing. With identical
//! subscriptions it converges as fast without the previous target (a
//! partial balanced plan fills up without moves), though a partition in
//! transit may then land elsewhere than the first target said.

use std::collections::{BTreeMap, BTreeSet};

/// A partition of a topic; ordered by topic, then index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    pub topic: String,
    pub index: u32,
}

impl Partition {
    pub fn new(topic: impl Into<String>, index: u32) -> Self {
        Partition {
            topic: topic.into(),
            index,
        }
    }
}

/// A live member of the group and the topics it subscribes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    pub topics: BTreeSet<String>,
}

/// Partitions by member id.
pub type Assignment = BTreeMap<String, BTreeSet<Partition>>;

/// What a plan is made from.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// The live members. A repeated id counts once, subscribed to the union
    /// of its topics.
    pub members: &'a [Member],
    /// Partition count of every topic that exists.
    pub partitions: &'a BTreeMap<String, u32>,
    /// What each member may be consuming: reported owned, or granted and
    /// not yet reported released. Entries of members not live are ignored.
    pub owned: &'a Assignment,
    /// The previous plan's target (empty for a group's first plan).
    pub assigned: &'a Assignment,
}

/// The outcome of [`plan`]: one entry per live member in each map, possibly
/// empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The balanced assignment the group is heading to.
    pub target: Assignment,
    /// What each member may consume in this generation: its target minus
    /// the partitions another live member still owns.
    pub now: Assignment,
}

/// Plans the group's assignment; see the module documentation.
pub fn plan(input: &Input<'_>) -> Plan {
    let subs = subscriptions(input.members);
    let eligible = eligible(&subs, input.partitions);
    let mut target: Assignment = subs
        .keys()
        .map(|id| (id.clone(), BTreeSet::new()))
        .collect();
    let (free, sole) = keep_holders(input, &subs, &eligible, &mut target);
    fill(free, &eligible, &mut target);
    balance(input.assigned, &subs, &eligible, &sole, &mut target);
    let now = grant(&target, input.owned);
    Plan { target, now }
}

/// Each member's part of `target` that no other member of `target` owns.
/// The coordinator can call it alone when a member reports a release.
pub fn grant(target: &Assignment, owned: &Assignment) -> Assignment {
    let mut owners: BTreeMap<&Partition, Vec<&str>> = BTreeMap::new();
    for (id, parts) in owned.iter().filter(|(id, _)| target.contains_key(*id)) {
        for p in parts {
            owners.entry(p).or_default().push(id);
        }
    }
    let others_own =
        |p: &Partition, id: &str| owners.get(p).is_some_and(|os| os.iter().any(|o| *o != id));
    target
        .iter()
        .map(|(id, parts)| {
            let mine = parts
                .iter()
                .filter(|p| !others_own(p, id))
                .cloned()
                .collect();
            (id.clone(), mine)
        })
        .collect()
}

/// Member id → topics, repeated ids merged.
fn subscriptions(members: &[Member]) -> BTreeMap<String, BTreeSet<String>> {
    let mut subs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in members {
        subs.entry(m.id.clone())
            .or_default()
            .extend(m.topics.iter().cloned());
    }
    subs
}

/// Topic → partition count and subscribers, for existing topics with at
/// least one subscriber.
fn eligible<'s>(
    subs: &'s BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
) -> BTreeMap<String, (u32, Vec<&'s str>)> {
    let mut out: BTreeMap<String, (u32, Vec<&str>)> = BTreeMap::new();
    for (id, topics) in subs {
        for t in topics {
            if let Some(&count) = partitions.get(t) {
                out.entry(t.clone())
                    .or_insert((count, Vec::new()))
                    .1
                    .push(id);
            }
        }
    }
    out
}

/// Puts every partition that has a holder in its holder's target; returns
/// the others, and the sole owner of each partition that has one.
fn keep_holders(
    input: &Input<'_>,
    subs: &BTreeMap<String, BTreeSet<String>>,
    eligible: &BTreeMap<String, (u32, Vec<&str>)>,
    target: &mut Assignment,
) -> (Vec<Partition>, BTreeMap<Partition, String>) {
    // Claims that count: by a live member subscribed to an existing topic,
    // within its partition count.
    let claims = |by: &Assignment| {
        let mut claims: BTreeMap<Partition, Vec<String>> = BTreeMap::new();
        for (id, parts) in by {
            let Some(topics) = subs.get(id) else { continue };
            for p in parts {
                let exists = eligible.get(&p.topic).is_some_and(|(n, _)| p.index < *n);
                if exists && topics.contains(&p.topic) {
                    claims.entry(p.clone()).or_default().push(id.clone());
                }
            }
        }
        claims
    };
    let (owners, assignees) = (claims(input.owned), claims(input.assigned));
    let (mut free, mut sole) = (Vec::new(), BTreeMap::new());
    for (topic, (count, _)) in eligible {
        for index in 0..*count {
            let p = Partition::new(topic.clone(), index);
            let holder = match (owners.get(&p), assignees.get(&p)) {
                (Some(os), _) if os.len() == 1 => {
                    sole.insert(p.clone(), os[0].clone());
                    Some(&os[0])
                }
                (_, Some(xs)) if xs.len() == 1 => Some(&xs[0]),
                _ => None,
            };
            match holder.and_then(|h| target.get_mut(h)) {
                Some(parts) => {
                    parts.insert(p);
                }
                None => free.push(p),
            }
        }
    }
    (free, sole)
}

/// Gives each free partition, in order, to the subscriber of its topic with
/// the fewest partitions (ties by id).
fn fill(
    free: Vec<Partition>,
    eligible: &BTreeMap<String, (u32, Vec<&str>)>,
    target: &mut Assignment,
) {
    let subscribers = |p: &Partition| eligible.get(&p.topic).map_or(&[][..], |(_, ids)| &ids[..]);
    for p in free {
        if let Some(id) = emptiest(subscribers(&p), None, target) {
            if let Some(parts) = target.get_mut(id) {
                parts.insert(p);
            }
        }
    }
}

/// The member of `ids` other than `except` with the fewest partitions,
/// ties by id (`ids` is sorted).
fn emptiest<'i>(ids: &[&'i str], except: Option<&str>, target: &Assignment) -> Option<&'i str> {
    let count = |id: &str| target.get(id).map_or(0, BTreeSet::len);
    ids.iter()
        .filter(|id| Some(**id) != except)
        .min_by_key(|id| (count(id), **id))
        .copied()
}

/// Moves partitions, one at a time, from the fullest member to the
/// emptiest subscriber of one of its topics while they differ by two or
/// more.
fn balance(
    assigned: &Assignment,
    subs: &BTreeMap<String, BTreeSet<String>>,
    eligible: &BTreeMap<String, (u32, Vec<&str>)>,
    sole: &BTreeMap<Partition, String>,
    target: &mut Assignment,
) {
    while let Some((donor, receiver)) = next_move(subs, eligible, sole, target) {
        let Some(parts) = target.get(&donor) else {
            return;
        };
        let receiver_topics = subs.get(&receiver);
        let assigned_to_receiver =
            |p: &Partition| assigned.get(&receiver).is_some_and(|s| s.contains(p));
        let moving = parts
            .iter()
            .filter(|p| receiver_topics.is_some_and(|ts| ts.contains(&p.topic)))
            .min_by_key(|p| (sole.get(*p) == Some(&donor), !assigned_to_receiver(p), *p))
            .cloned();
        let Some(p) = moving else { return };
        if let Some(parts) = target.get_mut(&donor) {
            parts.remove(&p);
        }
        if let Some(parts) = target.get_mut(&receiver) {
            parts.insert(p);
        }
    }
}

/// The next (donor, receiver): the donor with the most partitions that has
/// a subscriber of one of its topics with at least two fewer, and the
/// emptiest such subscriber. Among donors as full, the one that solely owns
/// the fewest of its partitions gives first, so that the members keeping a
/// share above the floor are those that own most. Then ties by id.
fn next_move(
    subs: &BTreeMap<String, BTreeSet<String>>,
    eligible: &BTreeMap<String, (u32, Vec<&str>)>,
    sole: &BTreeMap<Partition, String>,
    target: &Assignment,
) -> Option<(String, String)> {
    let count = |id: &str| target.get(id).map_or(0, BTreeSet::len);
    let owns = |id: &String| {
        let parts = target.get(id).into_iter().flatten();
        parts.filter(|p| sole.get(*p) == Some(id)).count()
    };
    // Only a member two above the emptiest can give (this keeps a long
    // rebalance from sorting every member on every move).
    let floor = subs.keys().map(|id| count(id)).min().unwrap_or(0);
    let mut donors: Vec<&String> = subs.keys().filter(|id| count(id) >= floor + 2).collect();
    donors.sort_by_cached_key(|id| (std::cmp::Reverse(count(id)), owns(id), *id));
    for donor in donors {
        let topics: BTreeSet<&String> = target.get(donor)?.iter().map(|p| &p.topic).collect();
        let receiver = topics
            .into_iter()
            .filter_map(|t| {
                emptiest(
                    eligible.get(t).map_or(&[][..], |(_, ids)| &ids[..]),
                    Some(donor),
                    target,
                )
            })
            .min_by_key(|id| (count(id), *id));
        if let Some(r) = receiver.filter(|r| count(r) + 2 <= count(donor)) {
            return Some((donor.clone(), r.to_string()));
        }
    }
    None
}

#[cfg(test)]
#[path = "assign_tests.rs"]
mod tests;
