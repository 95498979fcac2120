//! The group checker on synthetic runs: a clean run has no problem, and
//! each kind of broken promise is reported.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::*;
use crate::checker::value_for;

fn ack(partition: u32, offset: u64) -> Ack {
    Ack {
        partition,
        offset,
        value: value_for(partition, offset),
    }
}

fn handling(partition: u32, offset: u64, delivery_count: u32) -> Handled {
    Handled {
        partition,
        offset,
        value: value_for(partition, offset),
        delivery_count,
    }
}

fn sample(node: NodeId, partition: u32, committed: u64, high_watermark: u64) -> Sample {
    Sample {
        node,
        incarnation: 0,
        partition,
        committed,
        high_watermark,
        lag: high_watermark - committed.min(high_watermark),
    }
}

/// Two partitions of 3 records each, all acknowledged and handled once;
/// two nodes whose commits rise to the end.
fn clean_run() -> (Vec<Ack>, Vec<Handled>, Vec<Sample>) {
    let acks: Vec<Ack> = (0..2)
        .flat_map(|p| (0..3).map(move |o| ack(p, o)))
        .collect();
    let handled = acks
        .iter()
        .map(|a| handling(a.partition, a.offset, 1))
        .collect();
    let mut samples = Vec::new();
    for committed in [0, 2, 3] {
        for node in [1, 2] {
            for p in 0..2 {
                samples.push(sample(node, p, committed, 3));
            }
        }
    }
    (acks, handled, samples)
}

fn report(acks: &[Ack], handled: &[Handled], samples: &[Sample]) -> GroupReport {
    let finals: Vec<Sample> = samples[samples.len() - 4..].to_vec();
    GroupReport::analyse("synthetic", acks, handled, samples, &[1, 2], 2, &finals)
}

#[test]
fn a_clean_run_has_no_problem() {
    let (acks, handled, samples) = clean_run();
    let r = report(&acks, &handled, &samples);
    assert_eq!(r.problems(), Vec::<String>::new());
    assert_eq!((r.acked, r.handlings, r.distinct), (6, 6, 6));
    assert_eq!(r.redeliveries, 0);
}

#[test]
fn an_unhandled_record_is_reported() {
    let (acks, mut handled, samples) = clean_run();
    handled.retain(|h| (h.partition, h.offset) != (1, 2));
    let r = report(&acks, &handled, &samples);
    assert_eq!(r.unhandled, 1);
    assert_eq!(r.unhandled_first, vec!["1/2".to_string()]);
    assert_eq!(r.problems().len(), 1, "{:?}", r.problems());
}

#[test]
fn a_record_handled_at_another_partition_does_not_count() {
    let (acks, mut handled, samples) = clean_run();
    // Offset 1 of partition 0 was handled, but as partition 1's.
    handled[1].partition = 1;
    let r = report(&acks, &handled, &samples);
    assert_eq!(r.unhandled, 1);
    // And partition 1 holds another value there.
    assert_eq!(r.mismatched, 1);
}

#[test]
fn a_handled_value_other_than_the_acknowledged_one_is_reported() {
    let (acks, mut handled, samples) = clean_run();
    handled[4].value = Bytes::from_static(b"something else");
    let r = report(&acks, &handled, &samples);
    assert_eq!((r.unhandled, r.mismatched), (0, 1));
    assert_eq!(r.problems().len(), 1);
}

#[test]
fn redeliveries_are_counted_and_are_no_problem() {
    let (acks, mut handled, samples) = clean_run();
    handled.push(handling(0, 1, 2));
    handled.push(handling(0, 1, 3));
    handled.push(handling(1, 0, 2));
    let r = report(&acks, &handled, &samples);
    assert_eq!(r.redeliveries, 3);
    assert_eq!(r.distinct, 6);
    assert!(r.problems().is_empty(), "{:?}", r.problems());
}

#[test]
fn a_committed_offset_moving_backwards_on_one_node_is_reported() {
    let (acks, handled, mut samples) = clean_run();
    // Node 2 answers 1 for partition 0 after having answered 2.
    let at = samples
        .iter()
        .position(|s| (s.node, s.partition, s.committed) == (2, 0, 3))
        .expect("sample");
    samples[at].committed = 1;
    let r = report(&acks, &handled, &samples);
    assert_eq!(r.backwards.len(), 1);
    assert!(r.backwards[0].contains("node 2 partition 0: committed 1 after 2"));
}

#[test]
fn backwards_is_judged_per_node_and_against_the_highest_seen() {
    // Node 1 is ahead of node 2: that is staleness, not going back.
    let ahead = [sample(1, 0, 5, 9), sample(2, 0, 3, 9), sample(2, 0, 4, 9)];
    assert!(backwards(&ahead).is_empty());
    // 5, 4, 4: both 4s are below the 5 answered before.
    let dips = [sample(1, 0, 5, 9), sample(1, 0, 4, 9), sample(1, 0, 4, 9)];
    assert_eq!(backwards(&dips).len(), 2);
    // Partitions are apart.
    let two = [sample(1, 0, 5, 9), sample(1, 1, 1, 9)];
    assert!(backwards(&two).is_empty());
}

#[test]
fn a_commit_beyond_the_high_watermark_is_reported() {
    let (acks, handled, mut samples) = clean_run();
    let last = samples.len() - 1;
    samples[last].committed = 4;
    let r = report(&acks, &handled, &samples);
    assert_eq!(r.beyond_high_watermark.len(), 1);
    assert!(r.problems().iter().any(|p| p.contains("high watermark")));
}

#[test]
fn lag_at_the_end_or_a_silent_node_is_reported() {
    let (acks, handled, samples) = clean_run();
    let mut finals: Vec<Sample> = samples[samples.len() - 4..].to_vec();
    finals[0].lag = 2;
    let r = GroupReport::analyse("synthetic", &acks, &handled, &samples, &[1, 2], 2, &finals);
    assert_eq!(r.lagging.len(), 1, "{:?}", r.lagging);
    // Node 3 never answered at the end.
    let finals: Vec<Sample> = samples[samples.len() - 4..].to_vec();
    let r = GroupReport::analyse(
        "synthetic",
        &acks,
        &handled,
        &samples,
        &[1, 2, 3],
        2,
        &finals,
    );
    assert_eq!(r.lagging.len(), 2, "{:?}", r.lagging);
    assert!(r.lagging[0].contains("node 3"));
}

#[test]
fn an_empty_run_is_a_problem() {
    let r = GroupReport::analyse("empty", &[], &[], &[], &[1], 0, &[]);
    let problems = r.problems();
    assert!(problems
        .iter()
        .any(|p| p.contains("nothing was acknowledged")));
    assert!(problems
        .iter()
        .any(|p| p.contains("no node ever described")));
}

#[test]
fn the_handled_prefix_stops_at_the_first_hole() {
    let h = [
        handling(0, 0, 1),
        handling(0, 1, 1),
        handling(0, 3, 1),
        handling(1, 1, 1),
        handling(0, 1, 2),
    ];
    let prefix = handled_prefix(&h);
    assert_eq!(prefix.get(&0), Some(&2));
    assert_eq!(prefix.get(&1), Some(&0));
}

#[test]
fn commits_after_a_restart_must_keep_what_was_applied_and_stay_within_the_acks() {
    let before: BTreeMap<u32, u64> = [(0, 10), (1, 4)].into();
    let acked: BTreeMap<u32, u64> = [(0, 12), (1, 4)].into();
    let fine: BTreeMap<u32, u64> = [(0, 11), (1, 4)].into();
    assert!(commits_after_restart(&before, &acked, &fine).is_empty());
    // An applied commit lost.
    let lost: BTreeMap<u32, u64> = [(0, 9), (1, 4)].into();
    let found = commits_after_restart(&before, &acked, &lost);
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("partition 0") && found[0].contains("lost"));
    // A partition missing after the restart lost its commit too.
    let missing: BTreeMap<u32, u64> = [(0, 10)].into();
    assert_eq!(commits_after_restart(&before, &acked, &missing).len(), 1);
    // More committed than was acknowledged.
    let beyond: BTreeMap<u32, u64> = [(0, 13), (1, 4)].into();
    let found = commits_after_restart(&before, &acked, &beyond);
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("acknowledged"));
}

#[test]
fn the_highest_committed_is_taken_over_every_node() {
    let s = [sample(1, 0, 5, 9), sample(2, 0, 7, 9), sample(3, 1, 2, 9)];
    let top = highest_committed(&s);
    assert_eq!(top, [(0, 7), (1, 2)].into());
}

#[test]
fn a_restart_starts_a_new_run_for_backwards_and_is_judged_as_staleness() {
    let mut restarted = sample(1, 0, 2, 9);
    restarted.incarnation = 1;
    let mut caught_up = sample(1, 0, 6, 9);
    caught_up.incarnation = 1;
    let samples = [sample(1, 0, 5, 9), restarted, caught_up];
    assert!(backwards(&samples).is_empty());
    let stale = stale_after_restart(&samples);
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert!(stale[0].contains("committed 2 after its restart, 5 before"));
    // Later incarnations are judged against every earlier one.
    let mut third = sample(1, 0, 4, 9);
    third.incarnation = 2;
    let more = [sample(1, 0, 5, 9), caught_up, third];
    assert_eq!(stale_after_restart(&more).len(), 1);
    // Another node or partition is not compared.
    let mut other = sample(2, 0, 1, 9);
    other.incarnation = 1;
    assert!(stale_after_restart(&[sample(1, 0, 5, 9), other]).is_empty());
}

#[test]
fn staleness_after_a_restart_fails_the_run_unless_allowed() {
    let (acks, handled, mut samples) = clean_run();
    let mut stale = sample(1, 0, 1, 3);
    stale.incarnation = 1;
    samples.insert(samples.len() - 4, stale);
    let mut r = report(&acks, &handled, &samples);
    assert_eq!(r.stale_after_restart.len(), 1);
    assert!(r.backwards.is_empty());
    assert_eq!(r.problems().len(), 1, "{:?}", r.problems());
    r.allow_restart_replay = true;
    assert!(r.problems().is_empty());
}

#[test]
fn a_resumed_member_must_start_at_the_committed_offset_when_nothing_more_was_acked() {
    let committed: BTreeMap<u32, u64> = [(0, 5), (1, 0)].into();
    let fine = [handling(0, 6, 1), handling(0, 5, 2), handling(1, 0, 1)];
    assert!(resumed_at_committed(&committed, &committed, &fine).is_empty());
    // Partition 0 from 4: a committed record handled again.
    let early = [handling(0, 4, 1), handling(0, 5, 1)];
    let found = resumed_at_committed(&committed, &committed, &early);
    assert_eq!(found.len(), 1);
    assert!(found[0].contains("started at offset 4"));
    // Partition 1 from 2: records 0 and 1 skipped.
    let late = [handling(1, 2, 1)];
    assert_eq!(resumed_at_committed(&committed, &committed, &late).len(), 1);
}

#[test]
fn only_restarted_nodes_may_answer_beyond_the_high_watermark_when_replay_is_allowed() {
    let (acks, handled, mut samples) = clean_run();
    let mut restarted = sample(2, 1, 3, 2);
    restarted.incarnation = 1;
    samples.insert(samples.len() - 4, restarted);
    let mut r = report(&acks, &handled, &samples);
    assert_eq!(
        (
            r.beyond_high_watermark.len(),
            r.beyond_high_watermark_restarted
        ),
        (1, 1)
    );
    assert_eq!(r.problems().len(), 1, "{:?}", r.problems());
    r.allow_restart_replay = true;
    assert!(r.problems().is_empty(), "{:?}", r.problems());
    // A node that never restarted is judged all the same.
    let last = samples.len() - 1;
    samples[last].committed = 4;
    let mut r = report(&acks, &handled, &samples);
    r.allow_restart_replay = true;
    assert_eq!(r.problems().len(), 1, "{:?}", r.problems());
}

#[test]
fn a_resumed_member_starts_between_the_last_commit_seen_and_the_acked_end() {
    let committed: BTreeMap<u32, u64> = [(0, 96), (1, 50)].into();
    let acked: BTreeMap<u32, u64> = [(0, 103), (1, 50)].into();
    let at = |p: u32, o: u64| Handled {
        partition: p,
        offset: o,
        value: Bytes::new(),
        delivery_count: 1,
    };
    // At the commit seen, or at a later durable one up to the acked end.
    assert!(resumed_at_committed(&committed, &acked, &[at(0, 96), at(1, 50)]).is_empty());
    // A later durable commit on 0 is fine; 1 had nothing more acked.
    let found = resumed_at_committed(&committed, &acked, &[at(0, 103), at(1, 51)]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].starts_with("partition 1"), "{found:?}");
    // Below the commit: handled again.
    let below = resumed_at_committed(&committed, &acked, &[at(0, 95)]);
    assert!(below[0].contains("handled again"), "{below:?}");
    // Beyond what was acked: skipped.
    let beyond = resumed_at_committed(&committed, &acked, &[at(0, 104)]);
    assert!(beyond[0].contains("skipped"), "{beyond:?}");
}
