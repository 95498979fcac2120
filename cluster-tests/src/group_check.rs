//! The group checker: what a consumer group's run says about issue 9's
//! promises, as pure functions of recorded data (tested with synthetic
//! runs in `group_check_tests.rs`, each check shown to fail).
//!
//! What is recorded ([`crate::group_load`] records it):
//! - the producers' acknowledgements ([`Ack`], from the [`crate::Load`]);
//! - every handling of a record by a member ([`Handled`]: a record handed
//!   out by `GroupConsumer::next`, then acknowledged);
//! - the group's progress as each node answered `describe` ([`Sample`]),
//!   polled about every 100 ms, in the order each node answered.
//!
//! Definitions:
//! - **unhandled**: an acknowledged record no member ever handled
//!   (at-least-once broken);
//! - **mismatched**: a handling whose value is not the value acknowledged
//!   at that (partition, offset): the member was handed a record the
//!   topic does not hold there;
//! - **redeliveries**: handlings beyond the first of each (partition,
//!   offset): the price of at-least-once, reported, never a failure;
//! - **backwards**: one node process answering, for one partition, a
//!   committed offset below one it answered before (a committed offset
//!   only moves back by an explicit reset, which the runs checked here
//!   never do);
//! - **stale after a restart**: a node answering, after a restart, a
//!   committed offset below one it answered before the restart (it
//!   describes an older applied state than it had: issue 9 wants every
//!   node's answer stale by at most one commit interval);
//! - **beyond the high watermark**: an answer whose committed offset is
//!   above the high watermark of the same answer (a commit of records that
//!   do not exist);
//! - **lagging**: at the end, a node whose answer is missing a partition
//!   or shows a lag above 0.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde_json::json;

use crate::checker::Ack;
use crate::cluster::NodeId;

/// One handling of a record by a group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub partition: u32,
    pub offset: u64,
    pub value: Bytes,
    /// The broker's delivery count for this handing out.
    pub delivery_count: u32,
}

/// One partition's progress as one node answered `describe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub node: NodeId,
    /// Which run of the node's process answered: raised at each restart
    /// (see [`crate::group_load::Sampler::restarting`]).
    pub incarnation: u32,
    pub partition: u32,
    pub committed: u64,
    pub high_watermark: u64,
    pub lag: u64,
}

/// The acknowledged records that no handling covers.
pub fn unhandled<'a>(acks: &'a [Ack], handled: &[Handled]) -> Vec<&'a Ack> {
    let seen: std::collections::HashSet<(u32, u64)> =
        handled.iter().map(|h| (h.partition, h.offset)).collect();
    acks.iter()
        .filter(|a| !seen.contains(&(a.partition, a.offset)))
        .collect()
}

/// Handlings whose value differs from the one acknowledged at their
/// (partition, offset); handlings of offsets nobody saw acknowledged (a
/// send whose answer was lost) are not judged.
pub fn mismatched<'a>(acks: &[Ack], handled: &'a [Handled]) -> Vec<&'a Handled> {
    let at: HashMap<(u32, u64), &Bytes> = acks
        .iter()
        .map(|a| ((a.partition, a.offset), &a.value))
        .collect();
    handled
        .iter()
        .filter(|h| {
            at.get(&(h.partition, h.offset))
                .is_some_and(|v| **v != h.value)
        })
        .collect()
}

/// Handlings beyond the first of each (partition, offset).
pub fn redeliveries(handled: &[Handled]) -> u64 {
    let distinct: std::collections::HashSet<(u32, u64)> =
        handled.iter().map(|h| (h.partition, h.offset)).collect();
    (handled.len() - distinct.len()) as u64
}

/// Each time a node's process answered, for a partition, a committed
/// offset below the highest that same process had answered before,
/// described.
pub fn backwards(samples: &[Sample]) -> Vec<String> {
    let mut highest: BTreeMap<(NodeId, u32, u32), u64> = BTreeMap::new();
    let mut found = Vec::new();
    for s in samples {
        let top = highest
            .entry((s.node, s.incarnation, s.partition))
            .or_insert(s.committed);
        if s.committed < *top {
            found.push(format!(
                "node {} partition {}: committed {} after {}",
                s.node, s.partition, s.committed, top
            ));
        }
        *top = (*top).max(s.committed);
    }
    found
}

/// Each time a node answered, for a partition, a committed offset below
/// the highest it had answered in an earlier incarnation (before a
/// restart), described.
pub fn stale_after_restart(samples: &[Sample]) -> Vec<String> {
    // Per (node, partition): the highest answer of each incarnation.
    let mut per_run: BTreeMap<(NodeId, u32), BTreeMap<u32, u64>> = BTreeMap::new();
    let mut found = Vec::new();
    for s in samples {
        let runs = per_run.entry((s.node, s.partition)).or_default();
        let before = runs
            .range(..s.incarnation)
            .map(|(_, &c)| c)
            .max()
            .unwrap_or(0);
        if s.committed < before {
            found.push(format!(
                "node {} partition {}: committed {} after its restart, {} before",
                s.node, s.partition, s.committed, before
            ));
        }
        let top = runs.entry(s.incarnation).or_insert(s.committed);
        *top = (*top).max(s.committed);
    }
    found
}

/// Answers whose committed offset is above their high watermark,
/// described.
pub fn beyond_high_watermark(samples: &[Sample]) -> Vec<String> {
    samples
        .iter()
        .filter(|s| s.committed > s.high_watermark)
        .map(|s| {
            format!(
                "node {} partition {}: committed {} above the high watermark {}",
                s.node, s.partition, s.committed, s.high_watermark
            )
        })
        .collect()
}

/// For the final answers of `nodes` (`finals`: each node's last answer,
/// one sample per partition it reported), every node and partition of
/// `0..partitions` whose lag is not 0 or that is missing, described.
pub fn lagging(nodes: &[NodeId], partitions: u32, finals: &[Sample]) -> Vec<String> {
    let mut found = Vec::new();
    for &node in nodes {
        for p in 0..partitions {
            match finals.iter().find(|s| s.node == node && s.partition == p) {
                None => found.push(format!("node {node} partition {p}: no answer")),
                Some(s) if s.lag > 0 => found.push(format!(
                    "node {node} partition {p}: lag {} (committed {}, high watermark {})",
                    s.lag, s.committed, s.high_watermark
                )),
                Some(_) => {}
            }
        }
    }
    found
}

/// Per partition, the highest committed offset any node answered.
pub fn highest_committed(samples: &[Sample]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for s in samples {
        let top = out.entry(s.partition).or_insert(0);
        *top = (*top).max(s.committed);
    }
    out
}

/// Per partition, the end of the contiguous prefix of handled offsets
/// from offset 0: the most a commit may cover when every handled record
/// was acknowledged and no other was (no dead letters).
pub fn handled_prefix(handled: &[Handled]) -> BTreeMap<u32, u64> {
    let mut offsets: BTreeMap<u32, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for h in handled {
        offsets.entry(h.partition).or_default().insert(h.offset);
    }
    offsets
        .into_iter()
        .map(|(p, set)| {
            let mut end = 0;
            while set.contains(&end) {
                end += 1;
            }
            (p, end)
        })
        .collect()
}

/// Committed offsets after a crash or power cut (`after`, per partition)
/// against what was known before it: every commit any node applied
/// (`applied_before`, at least [`highest_committed`] of the samples) must
/// survive, and nothing beyond what was acknowledged (`acked_prefix`, see
/// [`handled_prefix`]) may be committed. Every violation, described.
pub fn commits_after_restart(
    applied_before: &BTreeMap<u32, u64>,
    acked_prefix: &BTreeMap<u32, u64>,
    after: &BTreeMap<u32, u64>,
) -> Vec<String> {
    let mut found = Vec::new();
    for (p, &before) in applied_before {
        let now = after.get(p).copied().unwrap_or(0);
        if now < before {
            found.push(format!(
                "partition {p}: committed {now} after the restart, {before} applied before: an \
                 applied commit was lost"
            ));
        }
    }
    for (p, &now) in after {
        let acked = acked_prefix.get(p).copied().unwrap_or(0);
        if now > acked {
            found.push(format!(
                "partition {p}: committed {now} after the restart, but only offsets below \
                 {acked} were acknowledged contiguously"
            ));
        }
    }
    found
}

/// A member that resumes after a restart starts each partition at its
/// committed offset (ADR 0009: "consumes each assigned partition from the
/// group's committed offset"). What the test sees of that offset is a
/// range: at least the highest commit any node showed (`committed`), and
/// at most the end of what was acknowledged before the cut
/// (`acked_prefix`): a commit proposed before the cut may be durable in the
/// log without having been applied (or sampled) anywhere yet, and it is
/// applied after the restart, before or while the member starts. The
/// lowest offset the member handled on a partition (`resumed`, its
/// handlings only) must lie in that range when it had records there:
/// below it, committed records are handled again; above it, records never
/// acknowledged are skipped. Every partition outside, described.
pub fn resumed_at_committed(
    committed: &BTreeMap<u32, u64>,
    acked_prefix: &BTreeMap<u32, u64>,
    resumed: &[Handled],
) -> Vec<String> {
    let mut first: BTreeMap<u32, u64> = BTreeMap::new();
    for h in resumed {
        let f = first.entry(h.partition).or_insert(h.offset);
        *f = (*f).min(h.offset);
    }
    let mut found = Vec::new();
    for (p, &offset) in &first {
        let low = committed.get(p).copied().unwrap_or(0);
        let high = acked_prefix.get(p).copied().unwrap_or(0).max(low);
        if offset < low {
            found.push(format!(
                "partition {p}: the resumed member started at offset {offset}, below the \
                 committed offset {low}: committed records handled again"
            ));
        } else if offset > high {
            found.push(format!(
                "partition {p}: the resumed member started at offset {offset}, beyond every \
                 commit and acknowledgement ({high}): records skipped"
            ));
        }
    }
    found
}

/// What a group run found; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct GroupReport {
    pub scenario: String,
    pub acked: u64,
    /// Handlings in all, and distinct (partition, offset)s handled.
    pub handlings: u64,
    pub distinct: u64,
    pub redeliveries: u64,
    pub unhandled: u64,
    /// The first few unhandled records, as `partition/offset`.
    pub unhandled_first: Vec<String>,
    pub mismatched: u64,
    pub samples: u64,
    pub backwards: Vec<String>,
    pub stale_after_restart: Vec<String>,
    pub beyond_high_watermark: Vec<String>,
    /// Of those, the answers of restarted nodes (incarnation above 0).
    pub beyond_high_watermark_restarted: usize,
    /// Whether [`GroupReport::problems`] lets two findings about restarted
    /// nodes pass (they are still reported): staleness after a restart, and
    /// a committed offset above the high watermark in a restarted node's
    /// answer. Only for scenarios run while the broker is known to describe
    /// a restarted node's state while it replays its log, and to publish a
    /// replay round's commits before its records.
    pub allow_restart_replay: bool,
    pub lagging: Vec<String>,
    /// Anything else the scenario found wrong (e.g. from
    /// [`commits_after_restart`]).
    pub other: Vec<String>,
}

impl GroupReport {
    /// Runs every check of the module docs over one run's records;
    /// `finals` are each node's last answers (see [`lagging`]).
    #[allow(clippy::too_many_arguments)]
    pub fn analyse(
        scenario: &str,
        acks: &[Ack],
        handled: &[Handled],
        samples: &[Sample],
        nodes: &[NodeId],
        partitions: u32,
        finals: &[Sample],
    ) -> GroupReport {
        let missing = unhandled(acks, handled);
        let distinct: std::collections::HashSet<(u32, u64)> =
            handled.iter().map(|h| (h.partition, h.offset)).collect();
        GroupReport {
            scenario: scenario.to_string(),
            acked: acks.len() as u64,
            handlings: handled.len() as u64,
            distinct: distinct.len() as u64,
            redeliveries: redeliveries(handled),
            unhandled: missing.len() as u64,
            unhandled_first: missing
                .iter()
                .take(10)
                .map(|a| format!("{}/{}", a.partition, a.offset))
                .collect(),
            mismatched: mismatched(acks, handled).len() as u64,
            samples: samples.len() as u64,
            backwards: backwards(samples),
            stale_after_restart: stale_after_restart(samples),
            beyond_high_watermark: beyond_high_watermark(samples),
            beyond_high_watermark_restarted: beyond_high_watermark(
                &samples
                    .iter()
                    .filter(|s| s.incarnation > 0)
                    .copied()
                    .collect::<Vec<_>>(),
            )
            .len(),
            allow_restart_replay: false,
            lagging: lagging(nodes, partitions, finals),
            other: Vec::new(),
        }
    }

    /// The report as one JSON object (lists cut to their first 10).
    pub fn to_json(&self) -> serde_json::Value {
        let first = |v: &Vec<String>| v.iter().take(10).cloned().collect::<Vec<_>>();
        json!({
            "scenario": self.scenario,
            "acked": self.acked,
            "handlings": self.handlings,
            "distinct_handled": self.distinct,
            "redeliveries": self.redeliveries,
            "unhandled": self.unhandled,
            "unhandled_first": self.unhandled_first,
            "mismatched": self.mismatched,
            "samples": self.samples,
            "backwards": self.backwards.len(),
            "backwards_first": first(&self.backwards),
            "stale_after_restart": self.stale_after_restart.len(),
            "stale_after_restart_first": first(&self.stale_after_restart),
            "beyond_high_watermark": self.beyond_high_watermark.len(),
            "beyond_high_watermark_first": first(&self.beyond_high_watermark),
            "beyond_high_watermark_restarted": self.beyond_high_watermark_restarted,
            "lagging": self.lagging,
            "other": self.other,
        })
    }

    /// Every promise this run broke; empty when clean: something was
    /// acknowledged and sampled, every acknowledged record handled, no
    /// handling of a foreign record, no committed offset backwards (nor
    /// older after a restart) or beyond the high watermark (both allowed
    /// of restarted nodes with [`GroupReport::allow_restart_replay`]), lag
    /// 0 on every node at the end, nothing else found.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.acked == 0 {
            p.push("nothing was acknowledged".to_string());
        }
        if self.samples == 0 {
            p.push("no node ever described the group".to_string());
        }
        if self.unhandled > 0 {
            p.push(format!(
                "{} acknowledged records never handled (first: {:?})",
                self.unhandled, self.unhandled_first
            ));
        }
        if self.mismatched > 0 {
            p.push(format!(
                "{} handlings of a record the topic does not hold there",
                self.mismatched
            ));
        }
        if !self.backwards.is_empty() {
            p.push(format!(
                "committed offsets moved backwards {} times (first: {})",
                self.backwards.len(),
                self.backwards[0]
            ));
        }
        if !self.stale_after_restart.is_empty() && !self.allow_restart_replay {
            p.push(format!(
                "restarted nodes described older commits than before {} times (first: {})",
                self.stale_after_restart.len(),
                self.stale_after_restart[0]
            ));
        }
        let beyond = if self.allow_restart_replay {
            self.beyond_high_watermark.len() - self.beyond_high_watermark_restarted
        } else {
            self.beyond_high_watermark.len()
        };
        if beyond > 0 {
            p.push(format!(
                "committed beyond the high watermark {beyond} times (first of all: {})",
                self.beyond_high_watermark[0]
            ));
        }
        if !self.lagging.is_empty() {
            p.push(format!("lag at the end: {:?}", self.lagging));
        }
        p.extend(self.other.iter().cloned());
        p
    }

    /// Prints the report as one JSON line, then panics naming every
    /// problem unless the run is clean.
    pub fn print_and_assert(&self) {
        println!("{}", self.to_json());
        let problems = self.problems();
        assert!(
            problems.is_empty(),
            "scenario {}: {}\n{}",
            self.scenario,
            problems.join("; "),
            self.to_json()
        );
    }
}

#[cfg(test)]
#[path = "group_check_tests.rs"]
mod tests;
