//! Tests of the sticky, cooperative assignment ([`super`]).

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
