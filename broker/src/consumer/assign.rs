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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(topic: &str, index: u32) -> Partition {
        Partition::new(topic, index)
    }

    fn member(id: &str, topics: &[&str]) -> Member {
        Member {
            id: id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn set(parts: &[(&str, u32)]) -> BTreeSet<Partition> {
        parts.iter().map(|(t, i)| p(t, *i)).collect()
    }

    fn counts(topics: &[(&str, u32)]) -> BTreeMap<String, u32> {
        topics.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    fn assignment(rows: &[(&str, &[(&str, u32)])]) -> Assignment {
        rows.iter()
            .map(|(id, parts)| (id.to_string(), set(parts)))
            .collect()
    }

    fn run(
        members: &[Member],
        partitions: &BTreeMap<String, u32>,
        owned: &Assignment,
        assigned: &Assignment,
    ) -> Plan {
        plan(&Input {
            members,
            partitions,
            owned,
            assigned,
        })
    }

    #[test]
    fn two_members_split_six_partitions_three_and_three() {
        let members = [member("a", &["t"]), member("b", &["t"])];
        let plan = run(
            &members,
            &counts(&[("t", 6)]),
            &Assignment::new(),
            &Assignment::new(),
        );
        let want = assignment(&[
            ("a", &[("t", 0), ("t", 2), ("t", 4)]),
            ("b", &[("t", 1), ("t", 3), ("t", 5)]),
        ]);
        assert_eq!(plan.target, want);
        assert_eq!(plan.now, want, "nobody owns anything: all granted at once");
    }

    #[test]
    fn a_joining_member_takes_one_from_each_only_once_released() {
        let members = [
            member("a", &["t"]),
            member("b", &["t"]),
            member("c", &["t"]),
        ];
        let topics = counts(&[("t", 6)]);
        let owned = assignment(&[
            ("a", &[("t", 0), ("t", 1), ("t", 2)]),
            ("b", &[("t", 3), ("t", 4), ("t", 5)]),
        ]);
        let first = run(&members, &topics, &owned, &Assignment::new());
        let want = assignment(&[
            ("a", &[("t", 1), ("t", 2)]),
            ("b", &[("t", 4), ("t", 5)]),
            ("c", &[("t", 0), ("t", 3)]),
        ]);
        assert_eq!(first.target, want, "two moves, one from each, no reshuffle");
        let now = assignment(&[
            ("a", &[("t", 1), ("t", 2)]),
            ("b", &[("t", 4), ("t", 5)]),
            ("c", &[]),
        ]);
        assert_eq!(first.now, now, "c waits until a and b release");

        // Replanned before anyone released: same course.
        assert_eq!(run(&members, &topics, &owned, &first.target), first);

        // a released t/0, b not yet t/3: c gets t/0 only.
        let owned = assignment(&[
            ("a", &[("t", 1), ("t", 2)]),
            ("b", &[("t", 3), ("t", 4), ("t", 5)]),
        ]);
        let second = run(&members, &topics, &owned, &first.target);
        assert_eq!(second.target, want);
        assert_eq!(second.now["c"], set(&[("t", 0)]));
        assert_eq!(
            second.now["b"],
            set(&[("t", 4), ("t", 5)]),
            "b keeps consuming what it keeps"
        );

        let owned = assignment(&[
            ("a", &[("t", 1), ("t", 2)]),
            ("b", &[("t", 4), ("t", 5)]),
            ("c", &[("t", 0)]),
        ]);
        let third = run(&members, &topics, &owned, &second.target);
        assert_eq!(third.target, want);
        assert_eq!(third.now, want);
    }

    #[test]
    fn a_leaving_members_partitions_spread_over_the_others() {
        let members = [member("a", &["t"]), member("b", &["t"])];
        // c left; its report is ignored, so its partitions are free at once.
        let owned = assignment(&[
            ("a", &[("t", 0), ("t", 1)]),
            ("b", &[("t", 2), ("t", 3)]),
            ("c", &[("t", 4), ("t", 5)]),
        ]);
        let plan = run(&members, &counts(&[("t", 6)]), &owned, &Assignment::new());
        let want = assignment(&[
            ("a", &[("t", 0), ("t", 1), ("t", 4)]),
            ("b", &[("t", 2), ("t", 3), ("t", 5)]),
        ]);
        assert_eq!(plan.target, want);
        assert_eq!(plan.now, want);
    }

    #[test]
    fn an_owner_no_longer_subscribed_is_revoked_before_the_new_owner_gets_it() {
        let members = [member("a", &["u"]), member("b", &["t"])];
        let topics = counts(&[("t", 1), ("u", 1)]);
        let owned = assignment(&[("a", &[("t", 0)])]);
        let first = run(&members, &topics, &owned, &Assignment::new());
        assert_eq!(
            first.target,
            assignment(&[("a", &[("u", 0)]), ("b", &[("t", 0)])])
        );
        assert_eq!(first.now, assignment(&[("a", &[("u", 0)]), ("b", &[])]));
        let owned = assignment(&[("a", &[("u", 0)])]);
        assert_eq!(
            run(&members, &topics, &owned, &first.target).now,
            first.target
        );
    }

    #[test]
    fn a_partition_claimed_by_two_members_is_in_neither_now_until_one_lets_go() {
        let members = [member("a", &["t"]), member("b", &["t"])];
        let topics = counts(&[("t", 2)]);
        let owned = assignment(&[("a", &[("t", 0)]), ("b", &[("t", 0), ("t", 1)])]);
        let first = run(&members, &topics, &owned, &Assignment::new());
        assert_eq!(
            first.target,
            assignment(&[("a", &[("t", 0)]), ("b", &[("t", 1)])])
        );
        assert_eq!(first.now, assignment(&[("a", &[]), ("b", &[("t", 1)])]));
        let owned = assignment(&[("a", &[("t", 0)]), ("b", &[("t", 1)])]);
        assert_eq!(
            run(&members, &topics, &owned, &first.target).now,
            first.target
        );
    }

    #[test]
    fn a_partition_in_dispute_moves_before_one_its_holder_solely_owns() {
        let members = [
            member("a", &["t"]),
            member("b", &["t"]),
            member("c", &["t"]),
        ];
        // a holds t/1 by the previous target only: b claims it too.
        let owned = assignment(&[("a", &[("t", 0), ("t", 1)]), ("b", &[("t", 1)])]);
        let assigned = assignment(&[("a", &[("t", 1)])]);
        let plan = run(&members, &counts(&[("t", 3)]), &owned, &assigned);
        let want = assignment(&[("a", &[("t", 0)]), ("b", &[("t", 2)]), ("c", &[("t", 1)])]);
        assert_eq!(plan.target, want);
        let now = assignment(&[("a", &[("t", 0)]), ("b", &[("t", 2)]), ("c", &[])]);
        assert_eq!(plan.now, now);
    }

    #[test]
    fn stale_ownership_is_dropped() {
        let members = [member("a", &["t", "gone"]), member("b", &["t"])];
        let owned = assignment(&[("a", &[("t", 5), ("gone", 0)]), ("b", &[("t", 1)])]);
        let plan = run(&members, &counts(&[("t", 2)]), &owned, &Assignment::new());
        assert_eq!(
            plan.target,
            assignment(&[("a", &[("t", 0)]), ("b", &[("t", 1)])])
        );
        assert_eq!(plan.now, plan.target);
    }

    #[test]
    fn members_without_known_topics_get_empty_entries_and_no_members_an_empty_plan() {
        let topics = counts(&[("t", 2)]);
        let members = [
            member("a", &[]),
            member("b", &["nope"]),
            member("c", &["t"]),
        ];
        let plan = run(&members, &topics, &Assignment::new(), &Assignment::new());
        let want = assignment(&[("a", &[]), ("b", &[]), ("c", &[("t", 0), ("t", 1)])]);
        assert_eq!(plan.target, want);
        assert_eq!(plan.now, want);
        let owned = assignment(&[("a", &[("t", 0)])]);
        assert_eq!(run(&[], &topics, &owned, &owned), Plan::default());
    }

    #[test]
    fn different_subscriptions_balance_where_subscriptions_allow() {
        let members = [member("a", &["t"]), member("b", &["t", "u"])];
        let topics = counts(&[("t", 2), ("u", 2)]);
        let want = assignment(&[("a", &[("t", 0), ("t", 1)]), ("b", &[("u", 0), ("u", 1)])]);
        // Fresh: t is spread over both, then b, full with u, gives t/1 to a.
        assert_eq!(
            run(&members, &topics, &Assignment::new(), &Assignment::new()).target,
            want
        );
        // b owns everything: only t can move to a, and both of it do.
        let owned = assignment(&[("b", &[("t", 0), ("t", 1), ("u", 0), ("u", 1)])]);
        let plan = run(&members, &topics, &owned, &Assignment::new());
        assert_eq!(plan.target, want);
        assert_eq!(
            plan.now,
            assignment(&[("a", &[]), ("b", &[("u", 0), ("u", 1)])])
        );
    }

    #[test]
    fn a_member_gives_up_first_what_it_does_not_consume_yet() {
        let members = [member("a", &["t"]), member("b", &["t"])];
        // The previous target gave a t/2 and t/3, which nobody owns now.
        let owned = assignment(&[("a", &[("t", 0), ("t", 1)])]);
        let assigned = assignment(&[("a", &[("t", 0), ("t", 1), ("t", 2), ("t", 3)])]);
        let plan = run(&members, &counts(&[("t", 4)]), &owned, &assigned);
        let want = assignment(&[("a", &[("t", 0), ("t", 1)]), ("b", &[("t", 2), ("t", 3)])]);
        assert_eq!(plan.target, want);
        assert_eq!(plan.now, want);
    }

    #[test]
    fn the_members_keeping_a_share_above_the_floor_are_those_owning_most() {
        let members = [
            member("a", &["t"]),
            member("b", &["t"]),
            member("c", &["t"]),
        ];
        // a and b hold two each, but b consumes neither of its own yet.
        let owned = assignment(&[("a", &[("t", 0), ("t", 1)])]);
        let assigned = assignment(&[("b", &[("t", 2), ("t", 3)])]);
        let plan = run(&members, &counts(&[("t", 4)]), &owned, &assigned);
        let want = assignment(&[
            ("a", &[("t", 0), ("t", 1)]),
            ("b", &[("t", 3)]),
            ("c", &[("t", 2)]),
        ]);
        assert_eq!(plan.target, want);
    }

    #[test]
    fn a_rerun_keeps_the_moves_under_way() {
        let members = [
            member("a", &["t"]),
            member("b", &["t"]),
            member("c", &["t"]),
        ];
        let owned = assignment(&[
            ("a", &[("t", 0), ("t", 1), ("t", 2)]),
            ("b", &[("t", 3), ("t", 4), ("t", 5)]),
        ]);
        // An earlier plan already revoked t/2 and t/5 for c.
        let assigned = assignment(&[
            ("a", &[("t", 0), ("t", 1)]),
            ("b", &[("t", 3), ("t", 4)]),
            ("c", &[("t", 2), ("t", 5)]),
        ]);
        let plan = run(&members, &counts(&[("t", 6)]), &owned, &assigned);
        assert_eq!(plan.target, assigned);
    }

    /// Topic names a scenario draws from; the last never exists.
    const TOPICS: [&str; 5] = ["t0", "t1", "t2", "t3", "t4"];

    #[derive(Clone, Debug)]
    struct Scenario {
        members: Vec<Member>,
        partitions: BTreeMap<String, u32>,
        owned: Assignment,
        assigned: Assignment,
    }

    impl Scenario {
        fn plan(&self) -> Plan {
            run(&self.members, &self.partitions, &self.owned, &self.assigned)
        }

        fn live(&self, id: &str) -> bool {
            self.members.iter().any(|m| m.id == id)
        }

        fn subscribes(&self, id: &str, topic: &str) -> bool {
            self.members
                .iter()
                .any(|m| m.id == id && m.topics.contains(topic))
        }

        /// Every partition of an existing topic some member subscribes to.
        fn wanted(&self) -> BTreeSet<Partition> {
            let subscribed = |t: &str| self.members.iter().any(|m| m.topics.contains(t));
            let topics = self.partitions.iter().filter(|(t, _)| subscribed(t));
            topics.flat_map(|(t, n)| (0..*n).map(|i| p(t, i))).collect()
        }

        /// The one live member, subscribed to its topic, that owns `p`.
        fn sole_owner(&self, p: &Partition) -> Option<&str> {
            let mut owners = self
                .owned
                .iter()
                .filter(|(id, ps)| ps.contains(p) && self.subscribes(id, &p.topic));
            match (owners.next(), owners.next()) {
                (Some((id, _)), None) => Some(id),
                _ => None,
            }
        }
    }

    /// Up to 8 live members (`m0`..), four topics of up to 12 partitions
    /// (some absent), subscriptions that may name a missing topic, and
    /// ownership and a previous target that may be stale, conflicting or
    /// name departed members (`m8`, `m9`).
    fn scenario(identical: bool) -> impl Strategy<Value = Scenario> {
        let claims = || prop::collection::vec((0..10usize, 0..5usize, 0..14u32), 0..40);
        (
            0..=8usize,
            prop::collection::vec(0..32u8, 8),
            prop::collection::vec(prop::option::of(0..=12u32), 4),
            claims(),
            prop::option::of(claims()),
        )
            .prop_map(move |(n, masks, sizes, owned, assigned)| {
                let topics = |mask: u8| {
                    TOPICS
                        .iter()
                        .enumerate()
                        .filter(move |(i, _)| mask & (1 << i) != 0)
                };
                let members = (0..n)
                    .map(|i| Member {
                        id: format!("m{i}"),
                        topics: topics(masks[if identical { 0 } else { i }])
                            .map(|(_, t)| t.to_string())
                            .collect(),
                    })
                    .collect();
                let partitions = sizes
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| Some((TOPICS[i].to_string(), (*n)?)))
                    .collect();
                let to_assignment = |claims: Vec<(usize, usize, u32)>| {
                    let mut out = Assignment::new();
                    for (m, t, i) in claims {
                        out.entry(format!("m{m}"))
                            .or_default()
                            .insert(p(TOPICS[t], i));
                    }
                    out
                };
                Scenario {
                    members,
                    partitions,
                    owned: to_assignment(owned),
                    assigned: assigned.map(to_assignment).unwrap_or_default(),
                }
            })
    }

    fn count(a: &Assignment, id: &str) -> usize {
        a.get(id).map_or(0, BTreeSet::len)
    }

    /// What holds for every plan, whatever the subscriptions.
    fn check(s: &Scenario, plan: &Plan) -> Result<(), TestCaseError> {
        let ids: BTreeSet<&String> = s.members.iter().map(|m| &m.id).collect();
        prop_assert_eq!(plan.target.keys().collect::<BTreeSet<_>>(), ids.clone());
        prop_assert_eq!(plan.now.keys().collect::<BTreeSet<_>>(), ids);

        // Every wanted partition in exactly one target, of a subscriber;
        // nothing else.
        let mut seen = BTreeSet::new();
        for (id, parts) in &plan.target {
            for q in parts {
                prop_assert!(seen.insert(q.clone()), "{q:?} in two targets");
                prop_assert!(
                    s.subscribes(id, &q.topic),
                    "{q:?} given to {id}, not subscribed"
                );
            }
        }
        prop_assert_eq!(seen, s.wanted());

        // now: within target, never owned by another live member, and
        // everything of the target that no other member owns.
        for (id, now) in &plan.now {
            for q in &plan.target[id] {
                let others_own = s
                    .owned
                    .iter()
                    .any(|(o, ps)| o != id && s.live(o) && ps.contains(q));
                prop_assert_eq!(now.contains(q), !others_own, "{:?} for {}", q, id);
            }
            prop_assert!(now.is_subset(&plan.target[id]));
        }

        // Local balance: no single move narrows a gap.
        for (a, parts) in &plan.target {
            for q in parts {
                for b in s.members.iter().filter(|m| m.topics.contains(&q.topic)) {
                    prop_assert!(
                        count(&plan.target, &b.id) + 1 >= parts.len(),
                        "{a} could give {q:?} to {}",
                        b.id
                    );
                }
            }
        }
        Ok(())
    }

    /// The fewest moves any balanced plan needs with identical
    /// subscriptions: members keep what they solely own up to their share,
    /// the biggest owners getting the shares one above the floor.
    fn fewest_moves(s: &Scenario) -> usize {
        let wanted = s.wanted();
        let n = s.members.len();
        if n == 0 {
            return 0;
        }
        let (floor, above) = (wanted.len() / n, wanted.len() % n);
        let mut held: Vec<usize> = s
            .members
            .iter()
            .map(|m| {
                wanted
                    .iter()
                    .filter(|q| s.sole_owner(q) == Some(&m.id))
                    .count()
            })
            .collect();
        held.sort_unstable_by(|x, y| y.cmp(x));
        held.iter()
            .enumerate()
            .map(|(i, h)| h.saturating_sub(floor + usize::from(i < above)))
            .sum()
    }

    proptest! {
        #[test]
        fn any_plan_covers_grants_safely_and_balances_locally(s in scenario(false)) {
            check(&s, &s.plan())?;
        }

        #[test]
        fn identical_subscriptions_balance_to_one_with_fewest_moves(s in scenario(true)) {
            let plan = s.plan();
            check(&s, &plan)?;
            let sizes: Vec<usize> = plan.target.values().map(BTreeSet::len).collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            prop_assert!(max.zip(min).is_none_or(|(max, min)| max - min <= 1), "{sizes:?}");
            let moved = s.wanted().iter().filter(|q| {
                s.sole_owner(q).is_some_and(|o| !plan.target[o].contains(*q))
            }).count();
            prop_assert_eq!(moved, fewest_moves(&s));
        }

        #[test]
        fn plans_do_not_depend_on_member_order(s in scenario(false)) {
            let mut reversed = s.clone();
            reversed.members.reverse();
            prop_assert_eq!(s.plan(), reversed.plan());
        }

        #[test]
        fn feeding_a_plan_back_converges_in_two_rounds(s in scenario(false)) {
            let first = s.plan();
            let again = Scenario { owned: first.now.clone(), assigned: first.target.clone(), ..s.clone() };
            let second = again.plan();
            check(&again, &second)?;
            prop_assert_eq!(&second.target, &first.target);
            prop_assert_eq!(&second.now, &second.target);
            let last = Scenario { owned: second.now.clone(), assigned: second.target.clone(), ..s };
            prop_assert_eq!(last.plan(), second);
        }

        #[test]
        fn identical_subscriptions_converge_without_the_previous_target(s in scenario(true)) {
            let first = s.plan();
            let again = Scenario { owned: first.now.clone(), assigned: Assignment::new(), ..s.clone() };
            let second = again.plan();
            prop_assert_eq!(&second.now, &second.target);
            let last = Scenario { owned: second.now.clone(), assigned: Assignment::new(), ..s };
            prop_assert_eq!(last.plan(), second);
        }
    }
}
